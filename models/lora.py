"""Low-rank adapters on the DiT's parallel linears: W x + (alpha / r) B A x, the base W frozen.

An adapter is attached to a column- or row-parallel linear (megatron's or
TransformerEngine's: anything that returns `(out, bias)`) as a child module
`lora` and a forward hook, so the base weight keeps its name and its place in
checkpoints, and the adapter's tensors are named `<linear>.lora.A` / `.B`
(canonical keys like every other tensor, see models/base.py).

TP layout (the base weight decides which factor is split):
    column-parallel W [out/tp, in]:  A [P*r, in] replicated,   B [out/tp, r] split on dim 0 like W
    row-parallel    W [out, in/tp]:  A [r, in/tp] split on dim 1 like W (packed like W), B [out, r] replicated
Column: h = A x is computed whole on every rank and its gradient all-reduced
over TP before B (megatron's copy-to-TP region), so A's gradient and x's are
complete. Row: the partial A x_r are all-reduced (reduce-from-TP region), then
the replicated B applies; its gradient is the same on every TP rank.

Fused QKV (P = 3): diffusers holds to_q, to_k, to_v with an adapter each, so
A stacks the three [A_q; A_k; A_v] and B holds B_q, B_k, B_v with rows
interleaved per head exactly like the fused weight ([q_h, k_h, v_h, ...]), so
a TP chunk of B is whole heads and each part's delta is B_p A_p x.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps

# which linears a target name covers (the last component of the module path)
TARGETS = {
    # FLUX.2's single block fuses the QKV and the MLP's input in one linear (diffusers to_qkv_mlp_proj): one adapter
    "qkv": ("linear_qkv", "linear_added_qkv", "linear_qkv_mlp"),
    "proj": ("linear_proj", "linear_added_proj"),  # FLUX single block: diffusers proj_out, [attention | MLP] -> H
    "mlp": ("linear_fc1", "linear_fc2", "linear_mlp_fc1"),
}
QKV = ("linear_qkv", "linear_added_qkv")


@dataclass(frozen=True)
class LoRASpec:
    rank: int
    alpha: float
    targets: tuple[str, ...] = tuple(TARGETS)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _set_tp(t: torch.Tensor, split: bool, dim: int = -1) -> None:
    t.tensor_model_parallel = split
    t.partition_dim = dim
    t.partition_stride = 1


class LoRA(torch.nn.Module):
    """The adapter of one parallel linear; `delta(x)` is what the hook adds to the linear's output."""

    def __init__(self, base: torch.nn.Module, rank: int, scale: float, parts: int, part_width: int):
        super().__init__()
        w = base.weight
        self.column = w.partition_dim == 0 if getattr(w, "tensor_model_parallel", False) else True
        self.rank, self.scale, self.parts, self.part_width = rank, scale, parts, part_width
        self.tp = ps.get_tensor_model_parallel_world_size()
        out_local, in_local = w.shape
        kw = dict(dtype=w.dtype, device=w.device)
        if self.column:
            self.A = torch.nn.Parameter(torch.zeros(parts * rank, in_local, **kw))
            self.B = torch.nn.Parameter(torch.zeros(out_local, rank, **kw))
            _set_tp(self.A, False)
            _set_tp(self.B, True, 0)
            if getattr(w, "packed_split", None):  # B's rows are split like the weight's (FLUX.2's fused input)
                self.B.packed_split = w.packed_split
                self.B.packed_names = getattr(w, "packed_names", None)
        else:
            self.A = torch.nn.Parameter(torch.zeros(rank, in_local, **kw))
            self.B = torch.nn.Parameter(torch.zeros(out_local, rank, **kw))
            _set_tp(self.A, True, 1)
            if getattr(w, "packed_split", None):
                self.A.packed_split = w.packed_split  # the single blocks' [attention | MLP] input
                self.A.packed_names = getattr(w, "packed_names", None)
            _set_tp(self.B, False)
        for p in (self.A, self.B):  # placed by PP like their layer (not replicated over stages)
            p.pipeline_parallel = getattr(w, "pipeline_parallel", False)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )

        h = F.linear(x, self.A)
        if self.column:
            if self.tp > 1:
                h = copy_to_tensor_model_parallel_region(h)
            if self.parts == 1:
                d = F.linear(h, self.B)
            else:
                b = self.B.view(-1, self.parts, self.part_width, self.rank)  # [heads, P, D, r]
                d = torch.einsum("...pr,npdr->...npd", h.unflatten(-1, (self.parts, self.rank)), b).flatten(-3)
        else:
            if self.tp > 1:
                h = reduce_from_tensor_model_parallel_region(h)
            d = F.linear(h, self.B)
        return d * self.scale


def _hook(module, args, output):
    out, bias = output
    return out + module.lora.delta(args[0]), bias


def canonical_init(full_shape: tuple[int, ...], key: str, seed: int) -> torch.Tensor:
    """PEFT's A init (kaiming_uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) of the whole canonical
    tensor, from a generator seeded by the global name: the same adapters at every TP/PP layout and rank."""
    digest = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(digest)
    bound = 1.0 / math.sqrt(full_shape[1])
    return (torch.rand(full_shape, generator=g) * 2 - 1) * bound


def add_lora(model: torch.nn.Module, spec: LoRASpec, head_dim: int, seed: int = 0) -> int:
    """Attach adapters to the targeted linears of `model` (a DiTBase stage), A initialised as PEFT does and B
    zero (the adapted model starts equal to its base), freeze everything else. Returns the adapter count."""
    from .base import local_slice

    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    wanted = {leaf for t in spec.targets for leaf in TARGETS[t]}
    linears = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in wanted and hasattr(m, "weight")]
    model.requires_grad_(False)
    for name, lin in linears:
        qkv = name.rsplit(".", 1)[-1] in QKV
        lora = LoRA(lin, spec.rank, spec.scale, 3 if qkv else 1, head_dim if qkv else lin.weight.shape[0])
        lin.add_module("lora", lora)
        full = list(lora.A.shape)
        if getattr(lora.A, "tensor_model_parallel", False):
            full[lora.A.partition_dim] *= tp
        key = model.global_name(f"{name}.lora.A")
        lin.register_forward_hook(_hook)
        if not lora.A.is_meta:  # a layout probe (checkpoint_layout) needs no values
            with torch.no_grad():
                lora.A.copy_(local_slice(lora.A, canonical_init(tuple(full), key, seed), tp_rank, tp))
    model.lora_spec = spec  # read by DiTBase.tensors: checkpoints of this model hold its adapters only
    return len(linears)


def _parts(lora: LoRA, a: torch.Tensor, b: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(B_p, A_p) per part: the fused QKV's q, k, v adapters, else the one pair."""
    r = b.shape[-1]  # lora.rank, or more for stacked factors
    if lora.parts == 1:
        return [(b, a)]
    bv = b.view(-1, lora.parts, lora.part_width, r)
    av = a.view(lora.parts, r, -1)
    return [(bv[:, p].reshape(-1, r), av[p]) for p in range(lora.parts)]


@torch.no_grad()
def product_norms_sq(model: torch.nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """sum over adapters of ||scale * B A||_F^2 for stand-in factors {linear name: (A, B)} laid out like the
    model's adapters, without forming B A: ||B A||^2 = tr((B^T B)(A A^T)), r x r Grams, the TP-split factor's
    Gram summed over the TP group (one all-reduce for all adapters). The total on every TP rank."""
    import torch.distributed as dist

    grams, n = [], 0
    for name, (a, b) in factors.items():
        lora = model.get_submodule(name).lora
        for bp, ap in _parts(lora, a, b):
            grams.append((bp.float().T @ bp.float(), ap.float() @ ap.float().T, lora.column, lora.scale))
            n += 1
    if not grams:
        return torch.zeros(())
    split = torch.stack([gb if column else ga for gb, ga, column, _ in grams])
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(split, group=ps.get_tensor_model_parallel_group())
    total = torch.zeros((), dtype=torch.float64)
    for (gb, ga, column, scale), s in zip(grams, split):
        g_b, g_a = (s, ga) if column else (gb, s)
        total += float(scale) ** 2 * float(torch.trace(g_b @ g_a))
    return total


def adapted_linears(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(getattr(m, "lora", None), LoRA)]


@torch.no_grad()
def ida_factor_error(fake: torch.nn.Module, generator: torch.nn.Module, lam: float) -> tuple[float, float]:
    """IDA on adapters blends the factors, A_f <- lam A_f + (1 - lam) A_g and B likewise; the effective weight
    then moves by the exact rule's (1 - lam)(W_g - W_f) plus an error E = -lam (1 - lam) s (B_f - B_g)(A_f - A_g)
    (expand the product). Returns (||E||^2, ||(1 - lam)(W_g - W_f)||^2) for the current factors, this rank's
    share of the replica's total (divided over TP, summed over PP by the caller's model-parallel sum)."""
    err, move = {}, {}
    for name in adapted_linears(fake):
        lf, lg = fake.get_submodule(name).lora, generator.get_submodule(name).lora
        err[name] = (lf.A - lg.A, lf.B - lg.B)
        parts, r = lf.parts, lf.rank
        a2 = torch.cat([lf.A.view(parts, r, -1), lg.A.view(parts, r, -1)], dim=1).reshape(parts * 2 * r, -1)
        b2 = torch.cat([lf.B.view(-1, parts, lf.part_width, r), -lg.B.view(-1, parts, lf.part_width, r)], dim=-1)
        move[name] = (a2, b2.reshape(-1, 2 * r))
    tp = ps.get_tensor_model_parallel_world_size()
    e = float(product_norms_sq(fake, err)) * (lam * (1 - lam)) ** 2
    m = float(product_norms_sq(fake, move)) * (1 - lam) ** 2
    return e / tp, m / tp


def spec_from_meta(meta: dict) -> LoRASpec:
    return LoRASpec(int(meta["rank"]), float(meta["alpha"]), tuple(meta["targets"]))


def canonical_delta(a: torch.Tensor, b: torch.Tensor, fused_qkv: bool, head_dim: int, scale: float) -> torch.Tensor:
    """scale * B A of canonical (TP=1) adapter tensors, in the base weight's layout (fused QKV: per part, rows
    interleaved per head like the weight)."""
    a, b = a.float(), b.float()
    if not fused_qkv:
        return scale * (b @ a)
    r = b.shape[-1]
    d = torch.einsum("npdr,pri->npdi", b.view(-1, 3, head_dim, r), a.view(3, r, -1))
    return scale * d.flatten(0, 2)
