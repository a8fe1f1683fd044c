"""Forward FLOP counts (multiply-add = 2 FLOPs) and parameter counts, used for MFU, pipeline balancing and the
memory planner.

Counted: every matmul (linear layers and attention QK^T / PV). Not counted:
norms, activations, RoPE, softmax (bandwidth-bound, a few percent at most).
A backward pass costs 2x the forward; with full recompute add one forward.

The building blocks below are shared; each family (models/<family>/__init__.py) composes them for its blocks,
and the functions at the end ask the family.
"""
from __future__ import annotations


def linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def attention_core(q_tokens: int, kv_tokens: int, hidden: int) -> int:
    return 2 * 2 * q_tokens * kv_tokens * hidden  # QK^T and PV


def mmdit_block(batch: int, s_img: int, s_txt: int, hidden: int, *, context_pre_only=False, dual=False,
                ffn: int | None = None, ffn_in: int | None = None, adaln: bool = True) -> int:
    """A double-stream (MMDiT) block. `ffn`: the MLP's hidden width (4h by default); `ffn_in`: the width its first
    linear produces (SwiGLU: twice `ffn`); `adaln`: the block computes its own modulation (FLUX.2 shares one)."""
    h, s = hidden, s_img + s_txt
    ffn = ffn or 4 * h
    ffn_in = ffn_in or ffn
    f = 0
    if adaln:
        f += linear(batch, h, (9 if dual else 6) * h) + linear(batch, h, (2 if context_pre_only else 6) * h)
    f += linear(batch * s, h, 3 * h)  # QKV of both streams
    f += attention_core(batch * s, s, h)
    f += linear(batch * s_img, h, h) + linear(batch * s_img, h, ffn_in) + linear(batch * s_img, ffn, h)
    if not context_pre_only:
        f += linear(batch * s_txt, h, h) + linear(batch * s_txt, h, ffn_in) + linear(batch * s_txt, ffn, h)
    if dual:
        f += linear(batch * s_img, h, 3 * h) + attention_core(batch * s_img, s_img, h) + linear(batch * s_img, h, h)
    return f


def flux_single_block(batch: int, s: int, hidden: int, *, ffn: int | None = None, ffn_in: int | None = None,
                      adaln: bool = True) -> int:
    """A single-stream (parallel attention + MLP) block; `ffn`, `ffn_in`, `adaln` as in mmdit_block."""
    h = hidden
    ffn = ffn or 4 * h
    ffn_in = ffn_in or ffn
    return (
        (linear(batch, h, 3 * h) if adaln else 0)
        + linear(batch * s, h, 3 * h)
        + attention_core(batch * s, s, h)
        + linear(batch * s, h, ffn_in)
        + linear(batch * s, h + ffn, h)
    )


def condition_flops(batch: int, hidden: int, pooled_dim: int = 0, guidance: bool = False) -> int:
    """Time (+ guidance) embedders 256 -> h -> h and, with `pooled_dim`, the pooled-text embedder pooled -> h -> h."""
    h = hidden
    per = linear(batch, 256, h) + linear(batch, h, h)
    return per * (2 if guidance else 1) + (linear(batch, pooled_dim, h) + linear(batch, h, h) if pooled_dim else 0)


def output_flops(batch: int, s_img: int, hidden: int, out_dim: int) -> int:
    """The output head: adaLN (h -> 2h, per sample) and the projection of every image token."""
    return linear(batch, hidden, 2 * hidden) + linear(batch * s_img, hidden, out_dim)


def _family(arch):
    from .registry import family_of

    return family_of(arch)


def block_costs(arch, batch: int, s_img: int, s_txt: int) -> list[int]:
    """Forward FLOPs of each block in global order."""
    return _family(arch).block_costs(arch, batch, s_img, s_txt)


def embed_flops(arch, batch: int, s_img: int, s_txt: int) -> tuple[int, int]:
    """(first-stage embedders, last-stage output layer) forward FLOPs."""
    return _family(arch).embed_flops(arch, batch, s_img, s_txt)


def forward_flops(arch, batch: int, s_img: int, s_txt: int) -> int:
    first, last = embed_flops(arch, batch, s_img, s_txt)
    return first + sum(block_costs(arch, batch, s_img, s_txt)) + last


def image_tokens(arch, latent_h: int, latent_w: int) -> int:
    """Image tokens of a latent (FLUX.1 and Qwen-Image pack 2x2, SD3 patchifies, FLUX.2's latent is patchified)."""
    return _family(arch).image_tokens(arch, latent_h, latent_w)


# --------------------------------------------------------------------------- parameter counts


def linear_params(fan_in: int, fan_out: int, bias: bool = True) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def condition_params(hidden: int, pooled_dim: int = 0, guidance: bool = False, bias: bool = True) -> int:
    """Parameters of condition_flops' embedders."""
    h = hidden
    per = linear_params(256, h, bias) + linear_params(h, h, bias)
    return per * (2 if guidance else 1) + (linear_params(pooled_dim, h, bias) + linear_params(h, h, bias)
                                           if pooled_dim else 0)


def block_params(arch) -> list[tuple[int, int]]:
    """(TP-split, TP-replicated) parameter counts of each block in global order.

    Split over TP: QKV, MLP and adaLN weights with their biases (column-parallel),
    and the weights of row-parallel outputs. Replicated: the biases of row-parallel
    outputs and the per-head QK RMS-norm weights. Same counts as diffusers' modules.
    """
    return _family(arch).block_params(arch)


def embedder_params(arch) -> int:
    """Parameters outside the blocks (embedders, shared modulation, final norm and projection); every stage."""
    return _family(arch).embedder_params(arch)


def param_count(arch) -> int:
    """Trainable parameters of the whole model (equal to diffusers' model.parameters())."""
    return embedder_params(arch) + sum(s + r for s, r in block_params(arch))


def block_lora_linears(arch, index: int) -> list[tuple[str, str, int, int, int]]:
    """(target, 'column' | 'row', in, out, parts) of every linear models/lora.py can adapt in block `index`
    (global order), as the family's blocks build them."""
    return _family(arch).block_lora_linears(arch, index)


def block_lora_params(arch, index: int, rank: int, targets, tp: int) -> int:
    """Adapter parameters of block `index` on one TP rank (column: A whole, B split; row: A split, B whole)."""
    n = 0
    for target, kind, fan_in, fan_out, parts in block_lora_linears(arch, index):
        if target in targets:
            n += parts * rank * fan_in + fan_out * rank // tp if kind == "column" else rank * fan_in // tp + fan_out * rank
    return n
