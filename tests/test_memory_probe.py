"""Activation memory measured: the per-block bytes memory_plan uses are what a role's forward keeps.

megatron_senseflow.memory_probe counts, with saved-tensor hooks, the bytes a DiT
forward keeps for backward, on the meta device at full width and real token
counts. These tests check (1) that the meta-device count equals the count of a
real CPU forward (the fused-attention substitution saves exactly what torch's
real kernel saves), and (2) that two depths differ by the plan's per-block figure,
at TP1 and TP2, with and without full recompute, for FLUX.1-dev's double and
single blocks, SD3.5 Medium's dual-attention block and FLUX.2-dev's double and single blocks (SD3.5 Large's joint
blocks are FLUX's double-block coefficients at another width, checked in (2) too).
"""
from __future__ import annotations

import pytest
import torch

from tests.dist_helpers import run_distributed

N_IMG, N_TXT = 4096, 512  # 1024 px: 64 x 64 latent patches, FLUX's 512 T5 tokens


def _real_vs_meta(env):
    """A tiny FLUX forward with real CPU tensors and the same forward on meta: what each saves."""
    from megatron_senseflow.memory_probe import SavedBytes, flash_attention_on_meta, model_inputs
    from megatron_senseflow.models import build_model, transformer_config
    from megatron_senseflow.models.configs import make_arch

    arch = make_arch("tiny-flux")
    cfg = transformer_config(arch, params_dtype=torch.bfloat16, use_cpu_initialization=True)
    out = []
    for device in ("cpu", "meta"):
        with torch.device(device):
            model = build_model(arch, cfg)
        counter = SavedBytes(model.parameters())
        inputs = model_inputs(arch, 2, 32, 24, torch.bfloat16, device=device)
        with flash_attention_on_meta(), counter.hooks():
            model(**inputs)
        out.append([(tuple(b.shape), str(b.dtype), b.untyped_storage().nbytes()) for b in counter.bases])
    return out


def test_meta_probe_counts_what_a_real_forward_saves():
    real, meta = run_distributed(_real_vs_meta, 1)[0]
    assert len(real) == len(meta) > 100
    stats = 0
    for (shape_r, dtype_r, bytes_r), (shape_m, dtype_m, bytes_m) in zip(real, meta):
        assert shape_r == shape_m
        if (dtype_r, dtype_m) == ("torch.bfloat16", "torch.float32") and shape_r[-1] == 1:
            # layer-norm mean / rstd: torch's CPU kernel keeps them in the input dtype, the CUDA kernel (and
            # the meta shape function, which follows it) in fp32; the probe counts what a GPU keeps
            assert bytes_m == 2 * bytes_r
            stats += 1
        else:
            assert (dtype_r, bytes_r) == (dtype_m, bytes_m), shape_r
    assert stats > 0


def _per_block(env, tp):
    from megatron_senseflow.memory_probe import saved_for_backward as probe

    out = {}
    for rc in ("none", "full"):
        base = probe("flux-dev", 1, 1, tp, rc).saved
        out[("flux", "joint", rc)] = probe("flux-dev", 2, 1, tp, rc).saved - base
        out[("flux", "single", rc)] = probe("flux-dev", 1, 2, tp, rc).saved - base
    one = probe("sd35-medium", 2, 0, tp, "none", dual=1).saved
    out[("sd35m", "dual", "none")] = probe("sd35-medium", 2, 0, tp, "none", dual=2).saved - one
    base = probe("sd35-large", 1, 0, tp, "none", text_tokens=154).saved
    out[("sd35l", "joint", "none")] = probe("sd35-large", 2, 0, tp, "none", text_tokens=154).saved - base
    base = probe("flux2-dev", 1, 1, tp, "none").saved
    out[("flux2", "flux2_double", "none")] = probe("flux2-dev", 2, 1, tp, "none").saved - base
    out[("flux2", "flux2_single", "none")] = probe("flux2-dev", 1, 2, tp, "none").saved - base
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_two_depths_differ_by_the_plans_per_block_figure(tp):
    from megatron_senseflow.memory_plan import RECOMPUTE_PER_TOKEN_HIDDEN, block_activation_bytes
    from megatron_senseflow.models.configs import make_arch

    measured = run_distributed(_per_block, tp, tp, tp=tp)[0]
    flux, medium, large = make_arch("flux-dev"), make_arch("sd35-medium"), make_arch("sd35-large")
    for (model, kind, rc), got in measured.items():
        arch, tokens = {"flux": (flux, N_IMG + N_TXT), "sd35m": (medium, N_IMG + N_TXT), "sd35l": (large, N_IMG + 154),
                        "flux2": (make_arch("flux2-dev"), N_IMG + N_TXT)}[model]
        if rc == "full":  # only the block's inputs (image and text streams) stay
            want = RECOMPUTE_PER_TOKEN_HIDDEN * tokens * arch.hidden_size
        else:
            want = block_activation_bytes(arch, tokens, 1, tp, False, 2, [kind])
        # residual: per-sample modulation vectors and fp32 log-sum-exp rows, not proportional to tokens x hidden
        assert got == pytest.approx(want, rel=4e-3), (model, kind, rc, got, want)
