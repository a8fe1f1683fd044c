"""The building blocks of FLOP and parameter counts (multiply-add = 2 FLOPs), which each family composes for its
blocks (models/<family>/__init__.py); models/flops.py asks the family for a whole model.

Counted: every matmul (linear layers and attention QK^T / PV). Not counted: norms, activations, RoPE, softmax
(bandwidth-bound, a few percent at most).
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


def linear_params(fan_in: int, fan_out: int, bias: bool = True) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def condition_params(hidden: int, pooled_dim: int = 0, guidance: bool = False, bias: bool = True) -> int:
    """Parameters of condition_flops' embedders."""
    h = hidden
    per = linear_params(256, h, bias) + linear_params(h, h, bias)
    return per * (2 if guidance else 1) + (linear_params(pooled_dim, h, bias) + linear_params(h, h, bias)
                                           if pooled_dim else 0)
