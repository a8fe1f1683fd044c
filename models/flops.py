"""Forward FLOP counts (multiply-add = 2 FLOPs), used for MFU and for pipeline balancing.

Counted: every matmul (linear layers and attention QK^T / PV). Not counted:
norms, activations, RoPE, softmax (bandwidth-bound, a few percent at most).
A backward pass costs 2x the forward; with full recompute add one forward.
"""
from __future__ import annotations

from .configs import Arch, FluxArch


def linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def attention_core(q_tokens: int, kv_tokens: int, hidden: int) -> int:
    return 2 * 2 * q_tokens * kv_tokens * hidden  # QK^T and PV


def mmdit_block(batch: int, s_img: int, s_txt: int, hidden: int, *, context_pre_only=False, dual=False) -> int:
    h, s = hidden, s_img + s_txt
    f = linear(batch, h, (9 if dual else 6) * h) + linear(batch, h, (2 if context_pre_only else 6) * h)  # adaLN
    f += linear(batch * s, h, 3 * h)  # QKV of both streams
    f += attention_core(batch * s, s, h)
    f += linear(batch * s_img, h, h) + linear(batch * s_img, h, 4 * h) + linear(batch * s_img, 4 * h, h)
    if not context_pre_only:
        f += linear(batch * s_txt, h, h) + linear(batch * s_txt, h, 4 * h) + linear(batch * s_txt, 4 * h, h)
    if dual:
        f += linear(batch * s_img, h, 3 * h) + attention_core(batch * s_img, s_img, h) + linear(batch * s_img, h, h)
    return f


def flux_single_block(batch: int, s: int, hidden: int) -> int:
    h = hidden
    return (
        linear(batch, h, 3 * h)
        + linear(batch * s, h, 3 * h)
        + attention_core(batch * s, s, h)
        + linear(batch * s, h, 4 * h)
        + linear(batch * s, 5 * h, h)
    )


def block_costs(arch: Arch, batch: int, s_img: int, s_txt: int) -> list[int]:
    """Forward FLOPs of each block in global order."""
    h = arch.hidden_size
    if isinstance(arch, FluxArch):
        return [mmdit_block(batch, s_img, s_txt, h)] * arch.num_layers + [
            flux_single_block(batch, s_img + s_txt, h)
        ] * arch.num_single_layers
    return [
        mmdit_block(
            batch, s_img, s_txt, h, context_pre_only=i == arch.num_layers - 1, dual=i in arch.dual_attention_layers
        )
        for i in range(arch.num_layers)
    ]


def embed_flops(arch: Arch, batch: int, s_img: int, s_txt: int) -> tuple[int, int]:
    """(first-stage embedders, last-stage output layer) forward FLOPs."""
    h = arch.hidden_size
    cond = linear(batch, 256, h) * (3 if arch.guidance_embeds else 2) + linear(
        batch, arch.pooled_projection_dim, h
    ) + linear(batch, h, h) * 2
    if isinstance(arch, FluxArch):
        first = linear(batch * s_img, arch.in_channels, h) + linear(batch * s_txt, arch.joint_attention_dim, h)
    else:
        first = linear(batch * s_img, arch.in_channels * arch.patch_size**2, h) + linear(
            batch * s_txt, arch.joint_attention_dim, h
        )
    last = linear(batch, h, 2 * h) + linear(batch * s_img, h, arch.out_dim)
    return first + cond, last


def forward_flops(arch: Arch, batch: int, s_img: int, s_txt: int) -> int:
    first, last = embed_flops(arch, batch, s_img, s_txt)
    return first + sum(block_costs(arch, batch, s_img, s_txt)) + last


def image_tokens(arch: Arch, latent_h: int, latent_w: int) -> int:
    """Image tokens of a latent: FLUX packs 2x2, SD3 patchifies by patch_size."""
    p = 2 if isinstance(arch, FluxArch) else arch.patch_size
    return (latent_h // p) * (latent_w // p)


# --------------------------------------------------------------------------- parameter counts


def _linear(fan_in: int, fan_out: int, bias: bool = True) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def block_params(arch: Arch) -> list[tuple[int, int]]:
    """(TP-split, TP-replicated) parameter counts of each block in global order.

    Split over TP: QKV, MLP and adaLN weights with their biases (column-parallel),
    and the weights of row-parallel outputs. Replicated: the biases of row-parallel
    outputs and the per-head QK RMS-norm weights. Same counts as diffusers' modules.
    """
    h, d = arch.hidden_size, arch.attention_head_dim
    ff_split = _linear(h, 4 * h) + 4 * h * h  # fc1 (column) + fc2 weight (row)
    if isinstance(arch, FluxArch):
        double = (2 * _linear(h, 6 * h) + 6 * _linear(h, h) + 2 * h * h + 2 * ff_split,
                  4 * d + 2 * h + 2 * h)  # q/k norms of both streams; out-proj and fc2 biases of both
        single = (_linear(h, 3 * h) + 3 * _linear(h, h) + _linear(h, 4 * h) + 5 * h * h, 2 * d + h)
        return [double] * arch.num_layers + [single] * arch.num_single_layers
    norms = 2 * d if arch.qk_norm else 0
    out = []
    for i in range(arch.num_layers):
        pre_only = i == arch.num_layers - 1
        dual = i in arch.dual_attention_layers
        split = _linear(h, (9 if dual else 6) * h) + _linear(h, (2 if pre_only else 6) * h)
        split += 6 * _linear(h, h) + h * h + ff_split  # QKV of both streams, image out-proj, image MLP
        rep = 2 * norms + h + h  # image out-proj and fc2 biases
        if not pre_only:
            split += h * h + ff_split
            rep += h + h
        if dual:
            split += 3 * _linear(h, h) + h * h
            rep += norms + h
        out.append((split, rep))
    return out


def embedder_params(arch: Arch) -> int:
    """Parameters outside the blocks (embedders, final norm and projection); replicated on every stage."""
    h = arch.hidden_size
    t_embed = _linear(256, h) + _linear(h, h)
    cond = t_embed + _linear(arch.pooled_projection_dim, h) + _linear(h, h)
    if isinstance(arch, FluxArch):
        if arch.guidance_embeds:
            cond += t_embed
        return (_linear(arch.in_channels, h) + _linear(arch.joint_attention_dim, h) + cond
                + _linear(h, 2 * h) + _linear(h, arch.out_dim))
    p = arch.patch_size
    return (arch.in_channels * p * p * h + h + _linear(arch.joint_attention_dim, h) + cond
            + _linear(h, 2 * h) + _linear(h, p * p * arch.out_channels))


def param_count(arch: Arch) -> int:
    """Trainable parameters of the whole model (equal to diffusers' model.parameters())."""
    return embedder_params(arch) + sum(s + r for s, r in block_params(arch))


def block_lora_linears(arch: Arch, index: int) -> list[tuple[str, str, int, int, int]]:
    """(target, 'column' | 'row', in, out, parts) of every linear models/lora.py can adapt in block `index`
    (global order), as models/blocks.py builds them."""
    h = arch.hidden_size
    qkv, proj = ("qkv", "column", h, 3 * h, 3), ("proj", "row", h, h, 1)
    fc1, fc2 = ("mlp", "column", h, 4 * h, 1), ("mlp", "row", 4 * h, h, 1)
    if isinstance(arch, FluxArch):
        if index < arch.num_layers:
            return [qkv, qkv, proj, proj, fc1, fc2, fc1, fc2]
        return [qkv, fc1, ("proj", "row", 5 * h, h, 1)]
    pre_only = index == arch.num_layers - 1
    out = [qkv, qkv, proj, fc1, fc2] + ([] if pre_only else [proj, fc1, fc2])
    if index in arch.dual_attention_layers:
        out += [qkv, proj]
    return out


def block_lora_params(arch: Arch, index: int, rank: int, targets, tp: int) -> int:
    """Adapter parameters of block `index` on one TP rank (column: A whole, B split; row: A split, B whole)."""
    n = 0
    for target, kind, fan_in, fan_out, parts in block_lora_linears(arch, index):
        if target in targets:
            n += parts * rank * fan_in + fan_out * rank // tp if kind == "column" else rank * fan_in // tp + fan_out * rank
    return n
