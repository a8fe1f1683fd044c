"""Our Megatron DiTs equal diffusers' own FluxTransformer2DModel / SD3Transformer2DModel.

Every rank builds the same random diffusers model (seeded), loads its weights
into our model at the given TP/PP layout through models.hf_mapping (the
mapping the converters use), runs megatron-core's forward-backward schedule
with 2 microbatches, and compares outputs (last stage) and every parameter
gradient of a scalar loss (each rank, its own shards) in fp32.
"""
from __future__ import annotations

from functools import partial

import pytest
import torch

from tests.dist_helpers import run_distributed

pytestmark = pytest.mark.slow
RTOL = 1e-5  # outputs
# Parameter grads: the QK-norm weight grads are sums of many cancelling terms and
# come out ~2e-5 relative under SP/TP reduction order (measured); everything else ~1e-7.
GRAD_RTOL = 1e-4

VARIANTS = {
    "flux-dev": ("tiny-flux", {"num_layers": 3, "num_single_layers": 2, "guidance_embeds": True}),
    "flux-student": ("tiny-flux", {"num_layers": 3, "num_single_layers": 2, "guidance_embeds": False}),
    "sd35-medium": ("tiny-sd3", {"num_layers": 4, "dual_attention_layers": (0, 1), "qk_norm": "rms_norm"}),
    "sd35-large": ("tiny-sd3", {"num_layers": 4, "dual_attention_layers": (), "qk_norm": "rms_norm"}),
    "sd3-medium": ("tiny-sd3", {"num_layers": 3, "dual_attention_layers": (), "qk_norm": None}),
    "qwen-image": ("tiny-qwen-image", {"num_layers": 3}),
    "flux2-dev": ("tiny-flux2", {"num_layers": 2, "num_single_layers": 2}),
    "flux2-klein": ("tiny-flux2-klein", {"num_layers": 2, "num_single_layers": 2}),
}


def reference(variant: str, seed: int = 0):
    import diffusers

    from megatron_senseflow.models.configs import arch_to_diffusers_config, make_arch

    preset, over = VARIANTS[variant]
    arch = make_arch(preset, over)
    cls = getattr(diffusers, arch.diffusers_class)
    kwargs = {k: v for k, v in arch_to_diffusers_config(arch).items() if k != "_class_name"}
    torch.manual_seed(seed)
    ref = cls(**kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return arch, ref


def inputs(arch, batch: int, latent_hw: tuple[int, int], num_txt: int, seed: int = 2):
    """The inputs users' verify_conversion runs use, with a random guidance scale per sample."""
    from megatron_senseflow.tools.verify_conversion import random_inputs

    return random_inputs(arch, batch, latent_hw, num_txt, seed, guidance=None)


def microbatches(batch: dict, n: int, arch) -> list[dict]:
    """n microbatches of a batch of diffusers inputs; what the batch shares (position ids) goes to each whole."""
    from megatron_senseflow.models import family_of

    per = {k: v for k, v in batch.items() if k in family_of(arch).per_sample_keys()}
    out = []
    for i in range(n):
        mb = dict(per)
        for k, v in batch.items():
            if k not in per:
                mb[k] = None if v is None else v.chunk(n)[i]
        out.append(mb)
    return out


def reference_backward(ref, batch: dict, num_mb: int, arch) -> tuple[torch.Tensor, torch.Tensor]:
    """The diffusers model's outputs and grads under the schedule's loss (<out, head> averaged over
    microbatches); returns (head, outputs)."""
    head = torch.randn(ref(**batch).sample.shape, generator=torch.Generator().manual_seed(9))
    ref_out = []
    for i, mb in enumerate(microbatches(batch, num_mb, arch)):
        out = ref(**mb).sample
        ref_out.append(out.detach())
        ((out * head.chunk(num_mb)[i]).sum() / num_mb).backward()
    return head, torch.cat(ref_out)


def _parity_body(env, variant, latent_hw, num_txt, sequence_parallel=False, pp_split=None, recompute="none"):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_senseflow.models import build_model, family_of, hf_mapping, transformer_config
    from megatron_senseflow.models.base import local_slice

    arch, ref = reference(variant)
    batch, num_mb = inputs(arch, 2, latent_hw, num_txt), 2
    head, ref_out = reference_backward(ref, batch, num_mb, arch)
    ref_params = dict(ref.named_parameters())
    # a parameter the output does not depend on (the text stream of Qwen-Image's last block) has no gradient
    ref_grads = dict(hf_mapping.hf_to_ours(arch, lambda k: (ref_params[k].grad if ref_params[k].grad is not None
                                                           else torch.zeros_like(ref_params[k]))
                                           if k in ref_params else torch.zeros(1)))

    cfg = transformer_config(arch, tp=env.tp, pp=env.pp, sequence_parallel=sequence_parallel, recompute=recompute)
    model = build_model(arch, cfg, tokens=(family_of(arch).image_tokens(arch, *latent_hw), num_txt), pp_split=pp_split)
    ref_sd = ref.state_dict()
    model.local_from_canonical(dict(hf_mapping.hf_to_ours(arch, ref_sd.__getitem__)))

    mbs = microbatches(batch, num_mb, arch)
    heads = head.chunk(num_mb)
    outputs = []

    def loss_func(i, out):
        outputs.append(out.detach().clone())
        loss = (out * heads[i]).sum()
        return loss, {"loss": loss.detach().clone()}

    def forward_step(it, m):
        i, mb = next(it)
        return m(**family_of(arch).our_inputs(arch, mb, num_txt)), partial(loss_func, i)

    seq = num_txt + family_of(arch).image_tokens(arch, *latent_hw)
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(list(enumerate(mbs))),
        model=[model],
        num_microbatches=num_mb,
        seq_length=seq,
        micro_batch_size=1,
        forward_only=False,
    )
    from megatron.core.distributed.finalize_model_grads import _allreduce_conditional_embedding_grads, _allreduce_non_tensor_model_parallel_grads

    # the trainer's DDP path calls finalize_model_grads; without DDP, run its reductions on .grad
    for p in model.parameters():
        if p.grad is None:  # a stage without blocks of a kind leaves FLUX.2's shared modulation of that kind unused
            p.grad = torch.zeros_like(p)
        p.main_grad = p.grad
    model.ddp_config = type("C", (), {"use_megatron_fsdp": False})()
    _allreduce_conditional_embedding_grads([model], cfg)
    _allreduce_non_tensor_model_parallel_grads([model], cfg)

    res = {"stage": env.pp_rank, "grads": {}}
    if env.is_last_stage:
        res["out"] = ((torch.cat(outputs) - ref_out).norm() / ref_out.norm()).item()
    for name, p in model.named_parameters():
        key = model.global_name(name)
        want = local_slice(p, ref_grads[key], env.tp_rank, env.tp)
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        res["grads"][key] = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
    return res


def check(results, variant):
    assert any("out" in r for r in results)
    for r in results:
        if "out" in r:
            assert r["out"] < RTOL, r["out"]
        bad = {k: v for k, v in r["grads"].items() if not v < GRAD_RTOL}
        assert not bad, bad
    from megatron_senseflow.models import hf_mapping
    from megatron_senseflow.models.configs import make_arch

    arch = make_arch(*VARIANTS[variant])
    seen = set().union(*(r["grads"] for r in results))
    # every parameter was compared on some rank (the SD3 positional grid is a buffer)
    assert seen == set(hf_mapping.our_keys(arch)) - {"pos_embed.pos_embed"}


LAYOUTS = {  # name -> (world, tp, pp)
    "tp1": (1, 1, 1),
    "tp2": (2, 2, 1),
    "pp2": (2, 1, 2),
    "tp2pp2": (4, 2, 2),
}


def latent_for(variant: str, sequence_parallel: bool = False) -> tuple[int, int]:
    if VARIANTS[variant][0] == "tiny-sd3":
        return (8, 12) if sequence_parallel else (6, 10)
    return (6, 8)


def _many(env, cases: list[tuple]) -> dict:
    """Several parity checks in one launch (the processes and imports are the slow part on 2 cores)."""
    return {name: _parity_body(env, variant, latent_for(variant, kw.get("sequence_parallel", False)), num_txt, **kw)
            for name, variant, num_txt, kw in cases}


def run_cases(world: int, cases: list[tuple], **layout) -> None:
    per_rank = run_distributed(_many, world, cases, **layout)
    for name, variant, *_ in cases:
        check([r[name] for r in per_rank], variant)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parity_with_diffusers(layout):
    """Every variant at one layout in one launch; sd3-medium differs from sd35-large only by the QK-norm, so its
    PP layouts add nothing."""
    world, tp, pp = LAYOUTS[layout]
    cases = [(v, v, 7, {}) for v in VARIANTS if not (v == "sd3-medium" and layout.startswith(("pp", "tp2pp")))]
    run_cases(world, cases, tp=tp, pp=pp)


def test_sequence_parallel_recompute_and_explicit_splits():
    """TP=2 with sequence parallel (every stream layout: FLUX.1's and FLUX.2's single blocks, SD3.5's MMDiT-X,
    Qwen-Image's masked text) and with activation recompute."""
    sp = {"sequence_parallel": True}
    cases = [(f"sp-{v}", v, 6, sp) for v in ("flux-dev", "sd35-medium", "qwen-image", "flux2-dev")]
    cases += [(f"{v}-{r}", v, 7, {"recompute": r}) for v, r in (("flux-dev", "full"), ("sd35-medium", "full"),
                                                              ("flux-dev", "selective"), ("qwen-image", "full"),
                                                              ("flux2-dev", "full"), ("flux2-dev", "selective"))]
    run_cases(2, cases, tp=2)


def test_explicit_pipeline_split_inside_double_blocks():
    # stage 0: double blocks 0-1; stage 1: double block 2 + both single blocks (FLUX.2: stage 1 has one double
    # block and both single ones, so both stages hold and use shared modulations of different kinds)
    run_cases(2, [("flux-dev", "flux-dev", 7, {"pp_split": [2, 3]}), ("flux2", "flux2-dev", 7, {"pp_split": [1, 3]})],
              pp=2)
