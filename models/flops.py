"""Forward FLOP counts (multiply-add = 2 FLOPs) and parameter counts of a whole model, used for MFU, pipeline
balancing and the memory planner: each asks the model's family, which composes the building blocks of
models/costs.py for its blocks.

Counted: every matmul (linear layers and attention QK^T / PV). Not counted:
norms, activations, RoPE, softmax (bandwidth-bound, a few percent at most).
A backward pass costs 2x the forward; with full recompute add one forward.
"""
from __future__ import annotations

from .registry import family_of


def block_costs(arch, batch: int, s_img: int, s_txt: int) -> list[int]:
    """Forward FLOPs of each block in global order."""
    return family_of(arch).block_costs(arch, batch, s_img, s_txt)


def embed_flops(arch, batch: int, s_img: int, s_txt: int) -> tuple[int, int]:
    """(first-stage embedders, last-stage output layer) forward FLOPs."""
    return family_of(arch).embed_flops(arch, batch, s_img, s_txt)


def forward_flops(arch, batch: int, s_img: int, s_txt: int) -> int:
    first, last = embed_flops(arch, batch, s_img, s_txt)
    return first + sum(block_costs(arch, batch, s_img, s_txt)) + last


def image_tokens(arch, latent_h: int, latent_w: int) -> int:
    """Image tokens of a latent (FLUX.1 and Qwen-Image pack 2x2, SD3 patchifies, FLUX.2's latent is patchified)."""
    return family_of(arch).image_tokens(arch, latent_h, latent_w)


# --------------------------------------------------------------------------- parameter counts


def block_params(arch) -> list[tuple[int, int]]:
    """(TP-split, TP-replicated) parameter counts of each block in global order.

    Split over TP: QKV, MLP and adaLN weights with their biases (column-parallel),
    and the weights of row-parallel outputs. Replicated: the biases of row-parallel
    outputs and the per-head QK RMS-norm weights. Same counts as diffusers' modules.
    """
    return family_of(arch).block_params(arch)


def embedder_params(arch) -> int:
    """Parameters outside the blocks (embedders, shared modulation, final norm and projection); every stage."""
    return family_of(arch).embedder_params(arch)


def param_count(arch) -> int:
    """Trainable parameters of the whole model (equal to diffusers' model.parameters())."""
    return embedder_params(arch) + sum(s + r for s, r in block_params(arch))


def block_lora_linears(arch, index: int) -> list[tuple[str, str, int, int, int]]:
    """(target, 'column' | 'row', in, out, parts) of every linear models/lora.py can adapt in block `index`
    (global order), as the family's blocks build them."""
    return family_of(arch).block_lora_linears(arch, index)


def block_lora_params(arch, index: int, rank: int, targets, tp: int) -> int:
    """Adapter parameters of block `index` on one TP rank (column: A whole, B split; row: A split, B whole)."""
    n = 0
    for target, kind, fan_in, fan_out, parts in block_lora_linears(arch, index):
        if target in targets:
            n += parts * rank * fan_in + fan_out * rank // tp if kind == "column" else rank * fan_in // tp + fan_out * rank
    return n
