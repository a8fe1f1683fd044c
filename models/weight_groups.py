"""The words a family describes its weights with: tensor groups that map diffusers' names onto ours.

A `Group` is one canonical tensor and the diffusers tensor(s) it is made of; the helpers build the groups of the
modules every family has (linears, fused attention, MLPs, conditioning embedders). Each family lists its groups
(`Family.groups`); models/hf_mapping.py converts them. This module imports nothing of the families.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Group:
    ours: str
    theirs: tuple[str, ...]
    kind: str = "copy"  # "copy" | "qkv" | "qkv_rows"


def linear(ours: str, theirs: str, bias: bool = True) -> list[Group]:
    g = [Group(f"{ours}.weight", (f"{theirs}.weight",))]
    return g + [Group(f"{ours}.bias", (f"{theirs}.bias",))] if bias else g


def qkv(ours: str, prefix: str, names: tuple[str, str, str], bias: bool = True) -> list[Group]:
    return [Group(f"{ours}.{p}", tuple(f"{prefix}.{n}.{p}" for n in names), "qkv") for p in ("weight", "bias")[: 1 + bias]]


def attention_groups(ours: str, theirs: str, *, joint: bool, qk_norm: bool, out: bool, context_out: bool,
                     bias: bool = True) -> list[Group]:
    """A (joint) attention with diffusers' to_q/to_k/to_v (+ add_*_proj), norm_q/norm_k, to_out.0, to_add_out."""
    g = qkv(f"{ours}.linear_qkv", theirs, ("to_q", "to_k", "to_v"), bias)
    if qk_norm:
        g += [Group(f"{ours}.q_layernorm.weight", (f"{theirs}.norm_q.weight",))]
        g += [Group(f"{ours}.k_layernorm.weight", (f"{theirs}.norm_k.weight",))]
    if out:
        g += linear(f"{ours}.linear_proj", f"{theirs}.to_out.0", bias)
    if joint:
        g += qkv(f"{ours}.linear_added_qkv", theirs, ("add_q_proj", "add_k_proj", "add_v_proj"), bias)
        if qk_norm:
            g += [Group(f"{ours}.added_q_layernorm.weight", (f"{theirs}.norm_added_q.weight",))]
            g += [Group(f"{ours}.added_k_layernorm.weight", (f"{theirs}.norm_added_k.weight",))]
        if context_out:
            g += linear(f"{ours}.linear_added_proj", f"{theirs}.to_add_out", bias)
    return g


def mlp_groups(ours: str, theirs: str, fc1: str = "net.0.proj", fc2: str = "net.2", bias: bool = True) -> list[Group]:
    """An MLP (diffusers FeedForward: net.0.proj, net.2; FLUX.2: linear_in, linear_out)."""
    return linear(f"{ours}.linear_fc1", f"{theirs}.{fc1}", bias) + linear(f"{ours}.linear_fc2", f"{theirs}.{fc2}", bias)


def condition_groups(guidance: bool, pooled: bool = True, prefix: str = "time_text_embed", bias: bool = True,
                     theirs_prefix: str | None = None) -> list[Group]:
    """The time (+ guidance) (+ pooled text) embedders, each linear_1 -> SiLU -> linear_2."""
    t = theirs_prefix or prefix
    names = ["timestep_embedder"] + (["guidance_embedder"] if guidance else []) + (["text_embedder"] if pooled else [])
    return [g for n in names for i in (1, 2) for g in linear(f"{prefix}.{n}.linear_{i}", f"{t}.{n}.linear_{i}", bias)]
