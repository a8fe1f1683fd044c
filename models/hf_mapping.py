"""Weight names and layouts: diffusers (FluxTransformer2DModel / SD3Transformer2DModel) <-> our canonical state dict.

The one place that knows both layouts; the parity tests and the converters
(`tools/convert_checkpoint.py`) use it. Mappings are per tensor group so a
converter can stream: each group reads a few diffusers tensors and yields one
of ours (or the reverse), never the whole model.

Layout changes (everything else is a rename):
- q, k, v projections -> one fused `linear_qkv`, rows interleaved per head
  ([q_h0, k_h0, v_h0, q_h1, ...]) so a contiguous TP chunk holds whole heads.
- FLUX single block `proj_out` keeps its [attention | MLP] input order; the
  model packs and unpacks it per TP rank (see models/blocks.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .configs import Arch, FluxArch, SD3Arch


@dataclass(frozen=True)
class Group:
    ours: str
    theirs: tuple[str, ...]
    kind: str = "copy"  # "copy" | "qkv"


def _linear(ours: str, theirs: str) -> list[Group]:
    return [Group(f"{ours}.weight", (f"{theirs}.weight",)), Group(f"{ours}.bias", (f"{theirs}.bias",))]


def _qkv(ours: str, prefix: str, names: tuple[str, str, str]) -> list[Group]:
    return [
        Group(f"{ours}.{p}", tuple(f"{prefix}.{n}.{p}" for n in names), "qkv") for p in ("weight", "bias")
    ]


def _attention(ours: str, theirs: str, *, joint: bool, qk_norm: bool, out: bool, context_out: bool) -> list[Group]:
    g = _qkv(f"{ours}.linear_qkv", theirs, ("to_q", "to_k", "to_v"))
    if qk_norm:
        g += [Group(f"{ours}.q_layernorm.weight", (f"{theirs}.norm_q.weight",))]
        g += [Group(f"{ours}.k_layernorm.weight", (f"{theirs}.norm_k.weight",))]
    if out:
        g += _linear(f"{ours}.linear_proj", f"{theirs}.to_out.0")
    if joint:
        g += _qkv(f"{ours}.linear_added_qkv", theirs, ("add_q_proj", "add_k_proj", "add_v_proj"))
        if qk_norm:
            g += [Group(f"{ours}.added_q_layernorm.weight", (f"{theirs}.norm_added_q.weight",))]
            g += [Group(f"{ours}.added_k_layernorm.weight", (f"{theirs}.norm_added_k.weight",))]
        if context_out:
            g += _linear(f"{ours}.linear_added_proj", f"{theirs}.to_add_out")
    return g


def _mlp(ours: str, theirs: str) -> list[Group]:
    return _linear(f"{ours}.linear_fc1", f"{theirs}.net.0.proj") + _linear(f"{ours}.linear_fc2", f"{theirs}.net.2")


def _condition(arch: Arch) -> list[Group]:
    g = _linear("time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_1")
    g += _linear("time_text_embed.timestep_embedder.linear_2", "time_text_embed.timestep_embedder.linear_2")
    if arch.guidance_embeds:
        g += _linear("time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_1")
        g += _linear("time_text_embed.guidance_embedder.linear_2", "time_text_embed.guidance_embedder.linear_2")
    g += _linear("time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_1")
    g += _linear("time_text_embed.text_embedder.linear_2", "time_text_embed.text_embedder.linear_2")
    return g


def flux_groups(arch: FluxArch) -> list[Group]:
    g = _linear("x_embedder", "x_embedder") + _linear("context_embedder", "context_embedder") + _condition(arch)
    for i in range(arch.num_layers):
        o, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        g += _linear(f"{o}.adaln.linear", f"{t}.norm1.linear")
        g += _linear(f"{o}.adaln_context.linear", f"{t}.norm1_context.linear")
        g += _attention(f"{o}.attention", f"{t}.attn", joint=True, qk_norm=True, out=True, context_out=True)
        g += _mlp(f"{o}.mlp", f"{t}.ff") + _mlp(f"{o}.mlp_context", f"{t}.ff_context")
    for i in range(arch.num_single_layers):
        o, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        g += _linear(f"{o}.adaln.linear", f"{t}.norm.linear")
        g += _attention(f"{o}.attention", f"{t}.attn", joint=False, qk_norm=True, out=False, context_out=False)
        g += _linear(f"{o}.linear_mlp_fc1", f"{t}.proj_mlp")
        g += _linear(f"{o}.linear_proj", f"{t}.proj_out")
    g += _linear("norm_out.linear", "norm_out.linear") + _linear("proj_out", "proj_out")
    return g


def sd3_groups(arch: SD3Arch) -> list[Group]:
    qk = arch.qk_norm is not None
    g = _linear("pos_embed.proj", "pos_embed.proj") + [Group("pos_embed.pos_embed", ("pos_embed.pos_embed",))]
    g += _linear("context_embedder", "context_embedder") + _condition(arch)
    for i in range(arch.num_layers):
        o, t = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        pre_only = i == arch.num_layers - 1
        g += _linear(f"{o}.adaln.linear", f"{t}.norm1.linear")
        g += _linear(f"{o}.adaln_context.linear", f"{t}.norm1_context.linear")
        g += _attention(f"{o}.attention", f"{t}.attn", joint=True, qk_norm=qk, out=True, context_out=not pre_only)
        if i in arch.dual_attention_layers:
            g += _attention(f"{o}.attention2", f"{t}.attn2", joint=False, qk_norm=qk, out=True, context_out=False)
        g += _mlp(f"{o}.mlp", f"{t}.ff")
        if not pre_only:
            g += _mlp(f"{o}.mlp_context", f"{t}.ff_context")
    g += _linear("norm_out.linear", "norm_out.linear") + _linear("proj_out", "proj_out")
    return g


def groups(arch: Arch) -> list[Group]:
    return flux_groups(arch) if isinstance(arch, FluxArch) else sd3_groups(arch)


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[N*D, ...] x3 -> [N*3*D, ...] with rows grouped per head."""
    rest = q.shape[1:]
    return torch.stack([t.reshape(num_heads, -1, *rest) for t in (q, k, v)], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rest = qkv.shape[1:]
    per_head = qkv.reshape(num_heads, 3, -1, *rest)
    return tuple(per_head[:, j].reshape(-1, *rest).contiguous() for j in range(3))


def group_to_ours(arch: Arch, grp: Group, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """One canonical tensor from the diffusers tensors of its group (the unit a streaming converter holds)."""
    tensors = [get(k) for k in grp.theirs]
    if grp.kind == "qkv":
        return interleave_qkv(*tensors, arch.num_attention_heads)
    return tensors[0]


def group_to_hf(arch: Arch, grp: Group, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The diffusers tensors of one group from its canonical tensor."""
    if grp.kind == "qkv":
        return list(zip(grp.theirs, split_qkv(t, arch.num_attention_heads)))
    return [(grp.theirs[0], t)]


def hf_to_ours(arch: Arch, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (canonical key, tensor) group by group; `get(diffusers_key)` reads one tensor."""
    for grp in groups(arch):
        yield grp.ours, group_to_ours(arch, grp, get)


def ours_to_hf(arch: Arch, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (diffusers key, tensor); `get(canonical_key)` reads one tensor."""
    for grp in groups(arch):
        yield from group_to_hf(arch, grp, get(grp.ours))


def hf_keys(arch: Arch) -> list[str]:
    return [k for grp in groups(arch) for k in grp.theirs]


def our_keys(arch: Arch) -> list[str]:
    return [grp.ours for grp in groups(arch)]


# --------------------------------------------------------------------------- LoRA adapters (models/lora.py)


def lora_groups(arch: Arch, targets: tuple[str, ...]) -> list[Group]:
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


def lora_to_hf(arch: Arch, targets: tuple[str, ...], get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(diffusers/PEFT key `<module>.lora_A.weight` / `.lora_B.weight`, tensor); `get(canonical key)` reads ours."""
    for grp in lora_groups(arch, targets):
        a, b = get(f"{grp.ours}.A"), get(f"{grp.ours}.B")
        if grp.kind == "qkv":
            for name, a_p, b_p in zip(grp.theirs, a.chunk(3), split_qkv(b, arch.num_attention_heads)):
                yield f"{name}.lora_A.weight", a_p.contiguous()
                yield f"{name}.lora_B.weight", b_p
        else:
            yield f"{grp.theirs[0]}.lora_A.weight", a
            yield f"{grp.theirs[0]}.lora_B.weight", b


def hf_to_lora(arch: Arch, targets: tuple[str, ...], get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical `<linear>.lora.A` / `.B`, tensor) from diffusers/PEFT adapter tensors; `get(key)` as above."""
    for grp in lora_groups(arch, targets):
        a = [get(f"{n}.lora_A.weight") for n in grp.theirs]
        b = [get(f"{n}.lora_B.weight") for n in grp.theirs]
        if grp.kind == "qkv":
            yield f"{grp.ours}.A", torch.cat(a)
            yield f"{grp.ours}.B", interleave_qkv(*b, arch.num_attention_heads)
        else:
            yield f"{grp.ours}.A", a[0]
            yield f"{grp.ours}.B", b[0]
