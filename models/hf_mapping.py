"""Weight names and layouts: diffusers transformers <-> our canonical state dict, the machinery every family shares.

The one place that knows both layouts; the parity tests and the converters
(`tools/convert_checkpoint.py`) use it. Each family lists its tensor groups
(`Family.groups`, built from models/weight_groups.py); a converter streams group by
group: each group reads a few diffusers tensors and yields one of ours (or the
reverse), never the whole model.

Layout changes (everything else is a rename):
- q, k, v projections -> one fused `linear_qkv`, rows interleaved per head
  ([q_h0, k_h0, v_h0, q_h1, ...]) so a contiguous TP chunk holds whole heads
  (kind 'qkv': three diffusers tensors, one of ours);
- an already fused [q; k; v; rest] projection (FLUX.2's single-block
  `to_qkv_mlp_proj`) keeps its rest and gets the q/k/v rows interleaved per
  head (kind 'qkv_rows': one tensor each side);
- packed weights ([attention | MLP] inputs of a single-block projection, a
  SwiGLU's [gate; up] rows) keep diffusers' order; the model packs and unpacks
  them per TP rank (`packed_split`, see models/base.py).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from .registry import family_of
from .weight_groups import Group


def groups(arch) -> list[Group]:
    return family_of(arch).groups(arch)


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[N*D, ...] x3 -> [N*3*D, ...] with rows grouped per head."""
    rest = q.shape[1:]
    return torch.stack([t.reshape(num_heads, -1, *rest) for t in (q, k, v)], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rest = qkv.shape[1:]
    per_head = qkv.reshape(num_heads, 3, -1, *rest)
    return tuple(per_head[:, j].reshape(-1, *rest).contiguous() for j in range(3))


def interleave_qkv_rows(t: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """[q; k; v; rest] rows -> [per-head q/k/v; rest] (kind 'qkv_rows')."""
    inner = num_heads * head_dim
    q, k, v, rest = t.split([inner, inner, inner, t.shape[0] - 3 * inner])
    return torch.cat([interleave_qkv(q, k, v, num_heads), rest])


def split_qkv_rows(t: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of interleave_qkv_rows."""
    inner = num_heads * head_dim
    fused, rest = t.split([3 * inner, t.shape[0] - 3 * inner])
    return torch.cat([*split_qkv(fused, num_heads), rest])


def group_to_ours(arch, grp: Group, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """One canonical tensor from the diffusers tensors of its group (the unit a streaming converter holds)."""
    tensors = [get(k) for k in grp.theirs]
    if grp.kind == "qkv":
        return interleave_qkv(*tensors, arch.num_attention_heads)
    if grp.kind == "qkv_rows":
        return interleave_qkv_rows(tensors[0], arch.num_attention_heads, arch.attention_head_dim)
    return tensors[0]


def group_to_hf(arch, grp: Group, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The diffusers tensors of one group from its canonical tensor."""
    if grp.kind == "qkv":
        return list(zip(grp.theirs, split_qkv(t, arch.num_attention_heads)))
    if grp.kind == "qkv_rows":
        return [(grp.theirs[0], split_qkv_rows(t, arch.num_attention_heads, arch.attention_head_dim))]
    return [(grp.theirs[0], t)]


def hf_to_ours(arch, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (canonical key, tensor) group by group; `get(diffusers_key)` reads one tensor."""
    for grp in groups(arch):
        yield grp.ours, group_to_ours(arch, grp, get)


def ours_to_hf(arch, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (diffusers key, tensor); `get(canonical_key)` reads one tensor."""
    for grp in groups(arch):
        yield from group_to_hf(arch, grp, get(grp.ours))


def hf_keys(arch) -> list[str]:
    return [k for grp in groups(arch) for k in grp.theirs]


def our_keys(arch) -> list[str]:
    return [grp.ours for grp in groups(arch)]


# --------------------------------------------------------------------------- LoRA adapters (models/lora.py)


def lora_groups(arch, targets: tuple[str, ...]) -> list[Group]:
    """One group per adapted linear: ours `<linear>.lora` <-> diffusers module(s) (three for a fused QKV)."""
    from .lora import TARGETS

    leaves = {leaf for t in targets for leaf in TARGETS[t]}
    out = []
    for grp in groups(arch):
        if not grp.ours.endswith(".weight"):
            continue
        module = grp.ours[: -len(".weight")]
        if module.rsplit(".", 1)[-1] in leaves:
            out.append(Group(f"{module}.lora", tuple(t[: -len(".weight")] for t in grp.theirs), grp.kind))
    return out


def lora_to_hf(arch, targets: tuple[str, ...], get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(diffusers/PEFT key `<module>.lora_A.weight` / `.lora_B.weight`, tensor); `get(canonical key)` reads ours."""
    for grp in lora_groups(arch, targets):
        a, b = get(f"{grp.ours}.A"), get(f"{grp.ours}.B")
        if grp.kind == "qkv":
            for name, a_p, b_p in zip(grp.theirs, a.chunk(3), split_qkv(b, arch.num_attention_heads)):
                yield f"{name}.lora_A.weight", a_p.contiguous()
                yield f"{name}.lora_B.weight", b_p
        elif grp.kind == "qkv_rows":  # one adapter; B's rows are laid out like the weight's
            yield f"{grp.theirs[0]}.lora_A.weight", a
            yield f"{grp.theirs[0]}.lora_B.weight", split_qkv_rows(b, arch.num_attention_heads, arch.attention_head_dim)
        else:
            yield f"{grp.theirs[0]}.lora_A.weight", a
            yield f"{grp.theirs[0]}.lora_B.weight", b


def hf_to_lora(arch, targets: tuple[str, ...], get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical `<linear>.lora.A` / `.B`, tensor) from diffusers/PEFT adapter tensors; `get(key)` as above."""
    for grp in lora_groups(arch, targets):
        a = [get(f"{n}.lora_A.weight") for n in grp.theirs]
        b = [get(f"{n}.lora_B.weight") for n in grp.theirs]
        if grp.kind == "qkv":
            yield f"{grp.ours}.A", torch.cat(a)
            yield f"{grp.ours}.B", interleave_qkv(*b, arch.num_attention_heads)
        elif grp.kind == "qkv_rows":
            yield f"{grp.ours}.A", a[0]
            yield f"{grp.ours}.B", interleave_qkv_rows(b[0], arch.num_attention_heads, arch.attention_head_dim)
        else:
            yield f"{grp.ours}.A", a[0]
            yield f"{grp.ours}.B", b[0]
