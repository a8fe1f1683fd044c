"""Building this rank's pipeline stage of any family's DiT on megatron-core.

`transformer_config(arch, ...)` makes the megatron TransformerConfig that carries the parallel layout, dtype and
recompute settings; `stage_layout` / `split_blocks` choose this stage's blocks; `build_model(arch, config, ...)`
builds them through the family (models/registry.py).
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer import TransformerConfig

from .base import DiTBase, StageLayout
from .configs import Arch
from .flops import block_costs
from .registry import family_of



def transformer_config(
    arch: Arch,
    *,
    tp: int = 1,
    pp: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    recompute: str = "none",
    use_cpu_initialization: bool | None = None,
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
    fp8_param: bool = False,
) -> TransformerConfig:
    arch.check_layout(tp, pp)
    cfg = TransformerConfig(
        num_layers=arch.num_blocks,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        kv_channels=arch.attention_head_dim,
        ffn_hidden_size=4 * arch.hidden_size,  # unused by our blocks (they size their MLPs), required by megatron
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        # names q_layernorm / k_layernorm: finalize_model_grads sums their grads over TP
        qk_layernorm=True,
        recompute_granularity={"none": None, "full": "full", "selective": "selective"}[recompute],
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        use_cpu_initialization=not torch.cuda.is_available() if use_cpu_initialization is None else use_cpu_initialization,
        init_method_std=0.02,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # FP8 (TE spec only): 'hybrid' = E4M3 forward, E5M2 gradients; 'e4m3' for forward-only roles.
        # fp8_param keeps the GEMM weights themselves in FP8 (the frozen teacher).
        fp8=fp8,
        fp8_recipe=fp8_recipe,
        fp8_param=fp8_param,
    )
    # replicated conditioning embedders on every stage: finalize_model_grads sums their grads over PP
    cfg.has_cond_embedder = True
    return cfg


def split_blocks(costs: list[float], num_stages: int) -> list[int]:
    """Blocks per stage, contiguous, minimising the most expensive stage (exact, O(n^2 * stages))."""
    n = len(costs)
    if num_stages > n:
        raise ValueError(f"{num_stages} pipeline stages for {n} blocks: each stage needs at least one block.")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: minimal max-stage cost of the first i blocks in k stages
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(k, n - (num_stages - k) + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    sizes, i = [], n
    for k in range(num_stages, 0, -1):
        j = cut[k][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def stage_layout(
    arch: Arch,
    pp: int,
    pp_rank: int,
    split: list[int] | None = None,
    tokens: tuple[int, int] = (4096, 512),
) -> StageLayout:
    """This stage's block range. Default split balances forward FLOPs at `tokens` = (image, text)."""
    costs = block_costs(arch, 1, *tokens)
    sizes = split if split is not None else split_blocks(costs, pp)
    if len(sizes) != pp or sum(sizes) != len(costs):
        raise ValueError(f"pipeline split {sizes} must give {pp} stages covering {len(costs)} blocks.")
    first = sum(sizes[:pp_rank])
    return StageLayout(first, first + sizes[pp_rank], pre_process=pp_rank == 0, post_process=pp_rank == pp - 1)


def build_model(
    arch: Arch,
    config: TransformerConfig,
    spec: str = "local",
    layout: StageLayout | None = None,
    pp_split: list[int] | None = None,
    tokens: tuple[int, int] = (4096, 512),
) -> DiTBase:
    """This rank's pipeline stage of `arch` (the whole model when PP=1)."""
    if layout is None:
        pp = ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
        rank = ps.get_pipeline_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
        layout = stage_layout(arch, pp, rank, pp_split, tokens)
    with fp8_init_context(config):
        model = _build(arch, config, spec, layout)
    if config.params_dtype != torch.float32:
        _cast_params(model, config.params_dtype)
    _sync_pipeline_replicated(model)
    return model


def fp8_init_context(config: TransformerConfig):
    """TE's fp8_model_init through megatron-core when the role keeps its GEMM weights in FP8."""
    if not config.fp8_param:
        from contextlib import nullcontext

        return nullcontext()
    from megatron.core.fp8_utils import get_fp8_context

    return get_fp8_context(config, is_init=True)


def _cast_params(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """model.to(dtype), except weights TE created in FP8 (casting would dequantize them)."""
    from megatron.core.fp8_utils import is_float8tensor

    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if p.dtype != dtype and not is_float8tensor(p):
                p.data = p.data.to(dtype)
        for name, b in m.named_buffers(recurse=False):
            if b.is_floating_point() and b.dtype != dtype:
                m._buffers[name] = b.to(dtype)


def _build(arch: Arch, config: TransformerConfig, spec: str, layout: StageLayout) -> DiTBase:
    from .specs import get_backend

    return family_of(arch).build(arch, config, get_backend(spec), layout)


def _sync_pipeline_replicated(model: DiTBase) -> None:
    """Embedders present on every stage start from the first stage's values (each stage
    seeds its init differently); a later checkpoint load overwrites them all alike."""
    if not ps.model_parallel_is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return
    import torch.distributed as dist

    src = ps.get_pipeline_model_parallel_first_rank()
    group = ps.get_pipeline_model_parallel_group()
    with torch.no_grad():
        for p in model.parameters():
            if getattr(p, "pipeline_parallel", False) and p.device.type != "meta":
                dist.broadcast(p.data, src=src, group=group)


