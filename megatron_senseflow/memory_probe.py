"""Activation memory measured, not estimated: the bytes a DiT role keeps for its backward.

One forward of a role's model, built at full width on the `meta` device (shapes
only: no memory, no arithmetic, so FLUX.1-dev's real 4096 + 512 tokens cost
nothing), under `torch.autograd.graph.saved_tensors_hooks`. Every tensor
autograd saves for backward passes through the hook; parameters are not
activations and are skipped, and views of one storage count once. The result is
what a GPU keeps between the forward and the backward of that role, at this
rank's TP shard, with or without full recompute.

The one substitution: on `meta`, torch's scaled_dot_product_attention takes its
math path, which saves the S x S attention matrix. On a GPU (and on CPU with
real tensors) it runs a fused kernel that saves q, k, v, the output and the
fp32 log-sum-exp per row. `flash_attention_on_meta` routes SDPA to
`aten._scaled_dot_product_flash_attention_for_cpu` inside the probe only, whose
autograd node saves exactly those; nothing outside the probe sees it.

Used by scripts/bench_memory.py (measured vs `senseflow memory-plan`) and the
memory tests. What it cannot see: allocator fragmentation, the transient
working set of a kernel (attention workspaces, the output of the block being
recomputed), and NCCL buffers; memory_plan adds those as separate terms.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def flash_attention_on_meta():
    """SDPA on meta tensors saves what the fused kernels save (see the module docstring)."""
    real = F.scaled_dot_product_attention

    def fused(q, k, v, *args, **kwargs):
        if q.device.type != "meta" or args or kwargs:
            return real(q, k, v, *args, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


class SavedBytes:
    """saved_tensors_hooks that add up the distinct non-parameter storages autograd keeps."""

    def __init__(self, params):
        self.param_ids = {id(p) for p in params}
        self.bases: list[torch.Tensor] = []  # kept alive so ids stay unique
        self.total = 0

    def pack(self, t: torch.Tensor):
        if id(t) in self.param_ids or isinstance(t, torch.nn.Parameter):
            return t
        base = t._base if t._base is not None else t
        if id(base) in self.param_ids or any(base is b for b in self.bases):
            return t
        self.bases.append(base)
        self.total += base.untyped_storage().nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def _megatron_buffers_on_meta():
    """On a CPU run megatron-core's buffers (TP all-gather outputs) are redirected from CUDA to CPU
    (cpu_megatron); in the probe they must be meta like the model. On a GPU nothing is redirected."""
    if torch.cuda.is_available():
        return contextlib.nullcontext()
    from megatron_senseflow import cpu_megatron

    return cpu_megatron.cuda_requests_to("meta")


@dataclass
class Probe:
    preset: str
    double: int  # FLUX double blocks / SD3 joint blocks
    single: int  # FLUX single blocks (0 for SD3)
    tp: int
    recompute: str
    saved: int  # bytes kept for backward on this rank
    sp: bool = False
    dual: int = 0


def model_inputs(arch, batch: int, latent_side: int, text_tokens: int, dtype, device="meta") -> dict:
    """The forward arguments the trainer passes a role (its family's, models/family.py) for latents of
    latent_side x latent_side."""
    from megatron_senseflow.models import family_of

    x = torch.randn(batch, arch.latent_channels, latent_side, latent_side, device=device, dtype=dtype)
    txt = torch.randn(batch, text_tokens, arch.text_dim, device=device, dtype=dtype)
    pooled = torch.randn(batch, arch.pooled_dim, device=device, dtype=dtype)
    sigma = torch.rand(batch, device=device)
    guide = torch.ones(batch, device=device) if arch.guidance_embeds else None
    return family_of(arch).model_inputs(arch, x, sigma, txt, pooled, guide)


def saved_for_backward(preset: str, double: int, single: int, tp: int, recompute: str, *, batch: int = 1,
                       resolution: int = 1024, text_tokens: int = 512, dtype=torch.bfloat16, sp: bool = False,
                       dual: int = 0) -> Probe:
    """Bytes one trainable role's forward keeps for backward on this rank (call on every rank of a TP
    group; megatron's parallel_state must be initialised with that TP size)."""
    from megatron_senseflow.models import build_model, family_of, transformer_config
    from megatron_senseflow.models.configs import make_arch

    base = make_arch(preset)
    arch = family_of(base).with_depth(base, double, single, dual)
    cfg = transformer_config(arch, tp=tp, params_dtype=dtype, recompute=recompute, use_cpu_initialization=True,
                             sequence_parallel=sp)
    with torch.device("meta"):
        model = build_model(arch, cfg)
    counter = SavedBytes(model.parameters())
    inputs = model_inputs(arch, batch, resolution // family_of(arch).vae_factor(), text_tokens, dtype)
    with flash_attention_on_meta(), _megatron_buffers_on_meta(), counter.hooks():
        model(**inputs)
    return Probe(preset, double, single, tp, recompute, counter.total, sp, dual)
