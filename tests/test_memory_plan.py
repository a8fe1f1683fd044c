"""`senseflow memory-plan`: parameter counts equal diffusers', static bytes equal what a real trainer allocates."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_senseflow import cli
from megatron_senseflow.config import load_config
from megatron_senseflow.memory_plan import GB, plan
from megatron_senseflow.models.configs import make_arch
from megatron_senseflow.models.flops import param_count
from tests.dist_helpers import run_distributed


@pytest.mark.parametrize("preset", ["flux-dev", "flux-schnell", "sd3-medium", "sd35-medium", "sd35-large", "tiny-flux", "tiny-sd3"])
def test_param_count_equals_diffusers(preset):
    import diffusers

    arch = make_arch(preset)
    kwargs = {f.name: (list(v) if isinstance(v := getattr(arch, f.name), tuple) else v) for f in dataclasses.fields(arch)}
    cls = getattr(diffusers, arch.diffusers_class)
    with torch.device("meta"):  # full-size models without allocating their weights
        model = cls(**kwargs)
    assert param_count(arch) == sum(p.numel() for p in model.parameters())


def _measure(env, overrides):
    """Bytes a real Trainer holds per rank for each DiT role, after optimizer states exist."""
    from megatron_senseflow.mcore_compat import prime_optimizer_state
    from megatron_senseflow.trainer import Trainer

    cfg = load_config("tiny", overrides)
    tr = Trainer(cfg, env)
    out = {}
    teacher = {id(p) for p in tr.T.module.parameters()}
    for role in (tr.T, tr.G, tr.F):
        # a LoRA role's base is the teacher's tensors: counted once, under the teacher
        own = [p for p in role.module.parameters() if role is tr.T or id(p) not in teacher]
        weights = sum(p.numel() * p.element_size() for p in own)
        grads = optim = 0
        if role.ddp is not None:
            prime_optimizer_state(role.optimizer)
            grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in role.ddp.buffers)
            for opt in getattr(role.optimizer, "chained_optimizers", [role.optimizer]):
                for st in opt.optimizer.state.values():
                    optim += sum(t.numel() * t.element_size() for k, t in st.items() if k != "step")
                for group in getattr(opt, "shard_fp32_from_float16_groups", []):  # fp32 main weights
                    optim += sum(p.numel() * 4 for p in group)
        out[role.name] = (weights, grads, optim)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tp, lora", [("float32", 1, 0), ("bfloat16", 1, 0), ("bfloat16", 2, 0), ("bfloat16", 1, 4),
                                             ("bfloat16", 2, 4)])
def test_static_memory_matches_a_real_trainer(dtype, tp, lora):
    prec = "fp32" if dtype == "float32" else "bf16"
    overrides = [f"model.params_dtype={dtype}", f"roles.generator.precision={prec}", f"roles.fake_score.precision={prec}",
                 f"roles.teacher.precision={prec}", "roles.discriminator.enabled=false", f"parallel.tp={tp}",
                 "train.output_dir=/tmp/unused-memory-plan", f"roles.generator.lora.rank={lora}",
                 f"roles.fake_score.lora.rank={lora}"]
    measured = run_distributed(_measure, 2, overrides, tp=tp)
    cfg = load_config("tiny", overrides)
    pl = {r.name: r for r in plan(cfg, 1, 2, 80).roles}
    for name in ("teacher", "generator", "fake_score"):
        w, g, o = max(m[name][0] for m in measured), max(m[name][1] for m in measured), max(m[name][2] for m in measured)
        r = pl[name]
        assert r.weights == pytest.approx(w, rel=0.02), name
        # DDP pads its grad buffer (and so the optimizer shards) for aligned reduce-scatters
        assert r.grads == pytest.approx(g, rel=0.05), name
        assert r.optimizer == pytest.approx(o, rel=0.05), name


def test_flux_dev_on_four_nodes_is_the_documented_arithmetic():
    """14P/M + 24P/(M D) bytes of static memory for bf16 FLUX.1-dev (README "Running on a cluster"), P counted exactly."""
    cfg = load_config("flux_dev")
    pl = plan(cfg, 4, 8, 80)
    by = {r.name: r for r in pl.roles}
    p_t, p_s = param_count(cfg.model.teacher_arch()), param_count(cfg.model.student_arch())
    m, d = 4, 8
    dit = by["teacher"].static + by["generator"].static + by["fake_score"].static
    # replicated embedders and row-parallel biases make the per-GPU share a little more than P/M
    assert dit == pytest.approx(2 * p_t / m + 2 * (6 * p_s / m + 12 * p_s / (m * d)), rel=0.02)
    assert pl.fits and 60 * GB < pl.total < 80 * GB


def test_options_that_save_memory_do(tmp_path):
    base = plan(load_config("flux_dev"), 1, 8, 80)
    fp8 = plan(load_config("flux_dev", ["model.spec=te", "roles.teacher.precision=fp8", "roles.teacher.fp8_weights=true"]), 1, 8, 80)
    off = plan(load_config("flux_dev", ["roles.generator.optimizer.cpu_offload=megatron",
                                        "roles.fake_score.optimizer.cpu_offload=deepspeed"]), 1, 8, 80)
    norec = plan(load_config("flux_dev", ["model.recompute=none"]), 1, 8, 80)
    nodist = plan(load_config("flux_dev", ["parallel.distributed_optimizer=false"]), 4, 8, 80)
    dist = plan(load_config("flux_dev"), 4, 8, 80)
    t = {r.name: r for r in base.roles}["teacher"]
    assert {r.name: r for r in fp8.roles}["teacher"].weights == pytest.approx(t.weights / 2, rel=0.03)  # GEMMs only
    g_off = {r.name: r for r in off.roles}["generator"]
    assert g_off.optimizer == 0 and g_off.host == pytest.approx({r.name: r for r in base.roles}["generator"].optimizer)
    assert norec.peak_activations > 2 * base.peak_activations
    assert nodist.total > dist.total + 50 * GB  # AdamW states replicated on 8 DP ranks instead of sharded


def test_cli_prints_the_table_and_says_when_it_does_not_fit(capsys):
    assert cli.main(["memory-plan", "flux_dev", "--nodes", "4", "--gpus-per-node", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "tp=4 pp=1 dp=8" in out and out.strip().splitlines()[-1].startswith("fits:")
    for role in ("teacher", "generator", "fake_score", "discriminator"):
        assert any(line.startswith(role) for line in out.splitlines())
    assert cli.main(["memory-plan", "flux_dev", "--nodes", "1", "--gpus-per-node", "8", "--tp", "2", "--gpu-mem", "80"]) == 1
    assert "does not fit" in capsys.readouterr().out
    assert cli.main(["memory-plan", "flux_dev", "--nodes", "1", "--gpus-per-node", "8", "--tp", "5"]) == 2
    assert "does not divide FLUX's 24 attention heads" in capsys.readouterr().err


def test_readme_memory_table_of_the_2025_teachers_is_the_plan():
    from pathlib import Path

    from megatron_senseflow.memory_plan import readme_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert readme_table() in readme, "README's Qwen-Image / FLUX.2 memory table is stale: paste memory_plan.readme_table()"
    # FLUX.2-dev's LoRA students at rank 64 fit one 8 x 80 GB node at the recipe's own layout (the README's claim)
    from megatron_senseflow.config import load_config
    from megatron_senseflow.memory_plan import plan

    cfg = load_config("flux2_dev", ["roles.generator.lora.rank=64", "roles.fake_score.lora.rank=64"])
    assert (cfg.parallel.tp, cfg.parallel.pp) == (8, 1) and plan(cfg, 1, 8, 80.0).fits
