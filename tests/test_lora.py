"""LoRA adapters (models/lora.py) equal PEFT's LoRA on diffusers' own models, at every TP/PP layout.

Every rank builds the same random diffusers model, injects PEFT adapters on the
modules our defaults target (diffusers' `add_adapter`, the path
`load_lora_weights` takes), randomises A and B, and loads base and adapters into
our model through models.hf_mapping (the mapping `senseflow export --lora`
writes with). Outputs and the adapters' gradients of a scalar loss must agree in
fp32 (megatron's forward-backward schedule, 2 microbatches).
"""
from __future__ import annotations

import argparse
import json
from functools import partial

import numpy as np
import pytest
import torch

from tests.dist_helpers import run_distributed
from tests.test_model_parity import LAYOUTS, VARIANTS, inputs, microbatches, reference, reference_backward

RANK, ALPHA = 4, 8.0


def peft_reference(variant: str, targets=("qkv", "proj", "mlp")):
    from megatron_senseflow.models import hf_mapping
    from peft import LoraConfig

    arch, ref = reference(variant)
    modules = [n for g in hf_mapping.lora_groups(arch, targets) for n in g.theirs]
    # full module names, anchored: "proj_out" alone would also adapt the model's final projection
    ref.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="|".join(f"^{n}$".replace(".", r"\.") for n in modules),
                               init_lora_weights=False))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return arch, ref, modules


def peft_key(key: str) -> str:
    """Adapter-file key (`m.lora_A.weight`) -> PEFT's in-model parameter name (`m.lora_A.default.weight`)."""
    return key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")


def _lora_body(env, variant, latent_hw, num_txt, pp_split=None, recomputes=("none", "selective", "full")):
    from megatron_senseflow.models import hf_mapping
    from megatron_senseflow.models.lora import LoRASpec

    arch, ref, modules = peft_reference(variant)
    batch, num_mb = inputs(arch, 2, latent_hw, num_txt), 2
    head, ref_out = reference_backward(ref, batch, num_mb, arch)
    params = dict(ref.named_parameters())
    spec = LoRASpec(RANK, ALPHA)
    ref_lora = dict(hf_mapping.hf_to_lora(arch, spec.targets, lambda k: params[peft_key(k)].detach()))
    # an adapter the output does not depend on (the text stream of Qwen-Image's last block) has no gradient
    ref_grads = dict(hf_mapping.hf_to_lora(arch, spec.targets, lambda k: params[peft_key(k)].grad
                                           if params[peft_key(k)].grad is not None
                                           else torch.zeros_like(params[peft_key(k)])))
    # PEFT keeps its base weights under `base_layer`
    base_sd = {k.replace(".base_layer", ""): v for k, v in ref.state_dict().items() if "lora_" not in k}

    # every recompute setting in one launch: the bundled recipes train with full recompute, where a frozen
    # base gives the checkpointed blocks no input that needs a gradient (models/layers.py maybe_checkpoint)
    return {r: _lora_grads(env, arch, spec, base_sd, ref_lora, ref_grads, batch, num_mb, head, ref_out, latent_hw,
                           num_txt, pp_split, r) for r in recomputes}


def _lora_grads(env, arch, spec, base_sd, ref_lora, ref_grads, batch, num_mb, head, ref_out, latent_hw, num_txt,
                pp_split, recompute):
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron_senseflow.models import build_model, family_of, hf_mapping, transformer_config
    from megatron_senseflow.models.base import local_slice
    from megatron_senseflow.models.lora import add_lora

    cfg = transformer_config(arch, tp=env.tp, pp=env.pp, recompute=recompute)
    model = build_model(arch, cfg, tokens=(family_of(arch).image_tokens(arch, *latent_hw), num_txt), pp_split=pp_split)
    model.local_from_canonical(dict(hf_mapping.hf_to_ours(arch, base_sd.__getitem__)))
    n = add_lora(model, spec, arch.attention_head_dim)
    model.local_from_canonical(ref_lora)  # now the adapters only (DiTBase.tensors)
    assert all(p.requires_grad == (".lora." in k) for k, p in model.named_parameters())

    mbs, heads, outputs = microbatches(batch, num_mb, arch), head.chunk(num_mb), []

    def loss_func(i, out):
        outputs.append(out.detach().clone())
        loss = (out * heads[i]).sum()
        return loss, {"loss": loss.detach().clone()}

    def forward_step(it, m):
        i, mb = next(it)
        return m(**family_of(arch).our_inputs(arch, mb, num_txt)), partial(loss_func, i)

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(list(enumerate(mbs))), model=[model],
        num_microbatches=num_mb, seq_length=num_txt + family_of(arch).image_tokens(arch, *latent_hw), micro_batch_size=1,
        forward_only=False,
    )
    res = {"adapters": n, "grads": {}, "raw": {}}
    if env.is_last_stage:
        res["out"] = ((torch.cat(outputs) - ref_out).norm() / ref_out.norm()).item()
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = model.global_name(name)
            want = local_slice(p, ref_grads[key], env.tp_rank, env.tp)
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            res["grads"][key] = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
            res["raw"][key] = got.detach().clone()
        else:
            assert p.grad is None, name
    return res


LAYOUT_VARIANTS = {  # one launch per layout, every variant and recompute setting in it
    "tp1": ("flux-dev", "sd35-medium", "qwen-image", "flux2-dev"),
    "tp2": ("flux-dev", "sd35-medium", "qwen-image", "flux2-dev"),
    "pp2": ("flux-dev", "sd35-large", "flux2-klein"),
}


def _lora_many(env, variants):
    from tests.test_model_parity import latent_for

    return {v: _lora_body(env, v, latent_for(v), 7) for v in variants}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUT_VARIANTS))
def test_lora_equals_peft_on_diffusers(layout):
    from megatron_senseflow.models import hf_mapping
    from megatron_senseflow.models.configs import make_arch

    world, tp, pp = LAYOUTS[layout]
    every = run_distributed(_lora_many, world, LAYOUT_VARIANTS[layout], tp=tp, pp=pp)
    for variant in LAYOUT_VARIANTS[layout]:
        per_rank = [r[variant] for r in every]
        arch = make_arch(*VARIANTS[variant])
        want = {f"{g.ours}.{x}" for g in hf_mapping.lora_groups(arch, ("qkv", "proj", "mlp")) for x in "AB"}
        for recompute in ("none", "selective", "full"):
            results = [r[recompute] for r in per_rank]
            assert any("out" in r for r in results)
            for r in results:
                if "out" in r:
                    assert r["out"] < 1e-5, (variant, recompute, r["out"])
                bad = {k: v for k, v in r["grads"].items() if not v < 1e-5}
                assert not bad, (variant, recompute, bad)
            seen = set().union(*(r["grads"] for r in results))
            assert seen == want and len(want) > 0, (variant, recompute)
            # recompute repeats the same forward: the adapters' gradients equal the no-recompute run's up to the
            # order in which autograd sums a tensor's gradient contributions (measured: FLUX equal, SD3.x <= 4.2e-7)
            for r, base in zip(results, (r["none"] for r in per_rank)):
                rel = {k: float((g - base["raw"][k]).norm() / base["raw"][k].norm().clamp_min(1e-12))
                       for k, g in r["raw"].items()}
                assert set(rel) == set(base["raw"]) and max(rel.values(), default=0.0) < 1e-6, (variant, recompute, rel)


# --------------------------------------------------------------------------- the trainer with LoRA roles

LORA = ["roles.generator.lora.rank=4", "roles.generator.lora.alpha=8", "roles.fake_score.lora.rank=4",
        "roles.fake_score.lora.alpha=8"]


def _lora_trainer_body(env, teacher, out, lam):
    """One shared base, adapters only in the optimizers, and IDA's effective-weight move checked by hand."""
    import torch
    from megatron_senseflow.models.lora import adapted_linears

    from megatron_senseflow.config import load_config
    from megatron_senseflow.trainer import Trainer

    cfg = load_config("tiny", [f"roles.teacher.checkpoint={teacher}", f"train.output_dir={out}", "train.max_steps=3",
                               "logging.tensorboard=false", f"distill.ida_lambda={lam}", "distill.ttur=1", *LORA,
                               f"parallel.tp={env.tp}"])
    t = Trainer(cfg, env)
    T, G, F = t.T.module, t.G.module, t.F.module
    teacher_params = {n: p for n, p in T.named_parameters()}
    res = {"shared": all(p is teacher_params[n] for n, p in G.named_parameters() if ".lora." not in n)
           and all(p is teacher_params[n] for n, p in F.named_parameters() if ".lora." not in n),
           "frozen_base": all(not p.requires_grad for n, p in G.named_parameters() if ".lora." not in n),
           "optimized": sum(p.numel() for g in t.G.optimizer.param_groups for p in g["params"]),
           "adapters": sum(p.numel() for n, p in G.named_parameters() if ".lora." in n)}
    # run one iteration, capturing the adapters just before IDA and the fake score's right after
    names = adapted_linears(F)
    captured = {}
    from megatron_senseflow import weights

    blend = weights.ida_blend

    def spy(fake, gen, lam_):
        captured["before"] = {n: (F.get_submodule(n).lora.A.clone(), F.get_submodule(n).lora.B.clone(),
                                  G.get_submodule(n).lora.A.clone(), G.get_submodule(n).lora.B.clone()) for n in names}
        out_ = blend(fake, gen, lam_)
        captured["after"] = {n: (F.get_submodule(n).lora.A.clone(), F.get_submodule(n).lora.B.clone()) for n in names}
        return out_

    import megatron_senseflow.methods as methods_mod

    methods_mod.ida_blend = spy
    try:  # a few iterations: the first updates can be zero under LR warm-up
        it = iter(t.data)
        for step in range(3):
            t.step = step
            logs = t.train_step(next(it))
    finally:
        methods_mod.ida_blend = blend
    # by hand (this rank's shards, TP-complete products): the factor blend and the error formula
    err_sq = exact_move_sq = 0.0
    for n in names:
        af, bf, ag, bg = (x.double() for x in captured["before"][n])
        af2, bf2 = (x.double() for x in captured["after"][n])
        assert torch.allclose(af2, lam * af + (1 - lam) * ag) and torch.allclose(bf2, lam * bf + (1 - lam) * bg)
        lora = F.get_submodule(n).lora
        s = lora.scale
        full = lambda a, b, lora=lora, s=s: gather_delta(env, lora, a, b) * s  # noqa: E731
        got = full(af2, bf2)  # effective delta after the blend
        exact = lam * full(af, bf) + (1 - lam) * full(ag, bg)  # W_f <- lam W_f + (1 - lam) W_g
        err_sq += float((got - exact).square().sum())
        exact_move_sq += float(((1 - lam) * (full(ag, bg) - full(af, bf))).square().sum())
    res.update(logs={k: v for k, v in logs.items() if k.startswith("ida/")}, err=err_sq ** 0.5,
               move=exact_move_sq ** 0.5, pp_rank=env.pp_rank)
    return res


def gather_delta(env, lora, a, b):
    """The whole B A of one adapter (all TP shards gathered), each part's product in the fused layout."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    def gather(t, dim):
        if env.tp == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(env.tp)]
        dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(parts, dim)

    if lora.column:
        b = gather(b, 0)
    else:
        a = gather(a, 1)
    if lora.parts == 1:
        return b @ a
    r = lora.rank
    return torch.einsum("npdr,pri->npdi", b.view(-1, 3, lora.part_width, r), a.view(3, r, -1)).flatten(0, 2)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_lora_roles_share_the_teacher_and_ida_moves_as_derived(tmp_path, tp):
    from tests.trainer_helpers import make_teacher

    teacher = make_teacher(tmp_path / "teacher")
    lam = 0.9
    results = run_distributed(_lora_trainer_body, tp, str(teacher), str(tmp_path / "run"), lam, tp=tp)
    for r in results:
        assert r["shared"] and r["frozen_base"]
        assert r["optimized"] == r["adapters"] > 0  # the optimizer holds the adapters and nothing else
    r = results[0]
    logged = r["logs"]
    assert logged["ida/lora_factor_error"] == pytest.approx(r["err"], rel=1e-4)
    assert logged["ida/lora_relative_error"] == pytest.approx(r["err"] / r["move"], rel=1e-4)
    assert 0 < r["err"] < r["move"]


# --------------------------------------------------------------------------- export: a diffusers LoRA and merged weights


def _adapted_export(hf_dir, root):
    """Import `hf_dir` as the base, add random rank-4 adapters, save them as a LoRA checkpoint and export it as a
    diffusers LoRA (ROOT/lora). Returns the adapted model and random inputs for it. A FLUX.1-dev-style base keeps
    its guidance embedder, as LoRA students do (model.student_guidance_embeds)."""
    from megatron_senseflow.models import build_model, transformer_config
    from megatron_senseflow.models.checkpoint_io import checkpoint_arch, load_model, save_model
    from megatron_senseflow.models.lora import LoRASpec, add_lora
    from megatron_senseflow.tools.convert_checkpoint import export_checkpoint, import_checkpoint
    from megatron_senseflow.tools.verify_conversion import random_inputs

    teacher = import_checkpoint(hf_dir, f"{root}/teacher", progress=False)
    arch = checkpoint_arch(teacher)
    model = build_model(arch, transformer_config(arch))
    load_model(model, arch, teacher)
    add_lora(model, LoRASpec(4, 8.0), arch.attention_head_dim)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.lora_base = str(teacher)
    save_model(model, arch, f"{root}/adapters")
    export_checkpoint(f"{root}/adapters", f"{root}/lora", lora=True)
    return model.eval(), random_inputs(arch, 2, (4, 4), 8, 3, guidance=None)


def _export_body(env, base_pipe, root):
    from megatron_senseflow.sample_cli import load_model as sample_load
    from megatron_senseflow.tools.convert_checkpoint import export_checkpoint

    model, batch = _adapted_export(base_pipe, root)
    export_checkpoint(f"{root}/adapters", f"{root}/merged", merge=True, base_pipeline=base_pipe, progress=False)
    with torch.no_grad():
        ours = model(**batch)
        args = argparse.Namespace(ckpt=f"{root}/adapters", role="generator", base=None, diffusers=None)
        sampled = sample_load(args, 1, 1)[0](**batch)  # `senseflow sample`'s loader: base + adapters
    return {"ours": ours, "sample": sampled, "batch": batch}


@pytest.mark.slow
def test_exported_lora_loads_into_a_diffusers_pipeline_and_equals_merged_weights(tmp_path):
    from diffusers import FluxPipeline

    from tests.test_convert_pipeline import _draw, build_base_pipeline

    base = build_base_pipeline(tmp_path)
    r = run_distributed(_export_body, 1, str(base), str(tmp_path))[0]
    lora_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    # readable like the rest of an export (safetensors alone writes 0600)
    assert lora_file.is_file() and lora_file.stat().st_mode & 0o044 == 0o044
    assert oct(lora_file.stat().st_mode & 0o777) == oct((tmp_path / "merged" / "model_index.json").stat().st_mode & 0o777)
    assert torch.allclose(r["sample"], r["ours"], rtol=0, atol=1e-6)

    # the stock pipeline as it comes (the teacher's transformer, guidance embedder included), no hand edits;
    # called with the guidance the student trained at, which the file records and `senseflow export` prints
    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as f:
        g = float(f.metadata()["senseflow.guidance_scale"])
    assert g == 1.0  # distill.student_guidance's default
    pipe = FluxPipeline.from_pretrained(base)
    assert pipe.transformer.config.guidance_embeds
    plain = _draw(pipe, g)
    pipe.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():  # diffusers' transformer with the LoRA loaded = our adapted model
        theirs = pipe.transformer(**r["batch"]).sample
    assert ((theirs - r["ours"]).norm() / r["ours"].norm()).item() < 1e-5
    with_lora = _draw(pipe, g)
    merged = FluxPipeline.from_pretrained(tmp_path / "merged")
    assert merged.transformer.config.guidance_embeds
    assert np.abs(plain - with_lora).max() > 10 / 255  # the adapters do change the image
    assert np.abs(with_lora - _draw(merged, g)).max() <= 1 / 255  # one grey level


def _export_sd3_body(env, transformer_dir, root):
    model, batch = _adapted_export(transformer_dir, root)
    with torch.no_grad():
        return {"ours": model(**batch), "batch": batch}


@pytest.mark.slow
def test_exported_sd3_lora_loads_with_the_sd3_pipeline_loader(tmp_path):
    """SD3.5 Medium (dual attention, qk norm): the exported file through `StableDiffusion3Pipeline.load_lora_weights`
    (the transformer-only pipeline: no text encoder keys are in the file) gives our adapted model's output."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from tests.test_model_parity import reference

    _, ref = reference("sd35-medium")
    ref.save_pretrained(tmp_path / "base" / "transformer")
    r = run_distributed(_export_sd3_body, 1, str(tmp_path / "base" / "transformer"), str(tmp_path))[0]
    none = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                          "tokenizer_3"])
    pipe = StableDiffusion3Pipeline(transformer=ref, scheduler=FlowMatchEulerDiscreteScheduler(), **none)
    with torch.no_grad():
        plain = pipe.transformer(**r["batch"]).sample
    pipe.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        theirs = pipe.transformer(**r["batch"]).sample
    assert ((plain - r["ours"]).norm() / r["ours"].norm()).item() > 1e-2  # the adapters do change the output
    assert ((theirs - r["ours"]).norm() / r["ours"].norm()).item() < 1e-5


# --------------------------------------------------------------------------- checkpoints and resume


@pytest.mark.slow
def test_lora_run_checkpoints_adapters_only_and_resumes_bit_identically(tmp_path):
    from megatron_senseflow.tools.megatron_io import RoleCheckpointReader

    from tests.test_resume import _args, _finish, _losses
    from tests.trainer_helpers import cli, make_teacher, metrics

    teacher = make_teacher(tmp_path / "teacher")
    ema = ["roles.generator.ema_decay=0.9"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    _finish(cli(_args(teacher, full, 4, 2) + LORA + ema))
    _finish(cli(_args(teacher, stopped, 2, 2) + LORA + ema))
    log = _finish(cli(_args(teacher, stopped, 4, 2) + LORA + ema))
    assert "resumed at step 2" in log
    want, got = _losses(metrics(full)), _losses(metrics(stopped))
    for step in (3, 4):
        assert got[step] == want[step], step  # every loss term, to the last digit
    assert "ida/lora_relative_error" in want[4]
    step_dir = full / "checkpoints" / "step_00000004"
    for role in ("generator", "fake_score", "ema"):
        keys = RoleCheckpointReader(step_dir / role).tensors
        assert keys and all(".lora." in k for k in keys), role
        meta = json.loads((step_dir / role / "senseflow_model.json").read_text())
        assert meta["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["qkv", "proj", "mlp"], "base": str(teacher)}


def _count_body(env, variant):
    from megatron_senseflow.models import build_model, transformer_config
    from megatron_senseflow.models.configs import make_arch
    from megatron_senseflow.models.flops import block_lora_params
    from megatron_senseflow.models.lora import LoRASpec, add_lora

    arch = make_arch(*VARIANTS[variant])
    model = build_model(arch, transformer_config(arch, tp=env.tp))
    add_lora(model, LoRASpec(3, 3.0, ("qkv", "mlp")), arch.attention_head_dim)
    built = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return built, sum(block_lora_params(arch, i, 3, ("qkv", "mlp"), env.tp) for i in range(arch.num_blocks))


@pytest.mark.parametrize("variant", ["flux-dev", "sd35-medium", "sd3-medium"])
def test_memory_plan_counts_the_adapters_a_model_builds(variant):
    for built, planned in run_distributed(_count_body, 2, variant, tp=2):
        assert built == planned > 0


@pytest.mark.parametrize("overrides, says", [
    (["roles.generator.lora.rank=4", "roles.fake_score.lora.rank=8"], "same rank, alpha and targets"),
    (["roles.generator.lora.rank=4", "roles.generator.lora.dropout=0.1"], "dropout is not supported"),
    (["roles.generator.lora.rank=4", "roles.fake_score.lora.rank=4", "parallel.sequence_parallel=true",
      "parallel.tp=2"], "sequence_parallel"),
    (["roles.generator.lora.rank=4", "roles.fake_score.lora.rank=4", "roles.teacher.precision=fp8",
      "roles.teacher.fp8_weights=true", "model.spec=te", "model.params_dtype=bfloat16"], "fp8_weights=false"),
    (["roles.generator.lora.rank=4", "roles.fake_score.lora.rank=4", "roles.generator.lora.targets=[]"], "targets is empty"),
])
def test_lora_settings_that_cannot_run_are_refused_in_one_sentence(overrides, says):
    from megatron_senseflow.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=says):
        load_config("tiny", overrides).validate(world_size=2)


def test_ida_off_allows_different_adapters_per_role():
    from megatron_senseflow.config import load_config

    load_config("tiny", ["roles.generator.lora.rank=4", "roles.fake_score.lora.rank=8",
                         "distill.ida_lambda=1"]).validate(world_size=1)
