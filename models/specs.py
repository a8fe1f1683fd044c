"""Layer specs: which class implements each submodule, and therefore how it is split over TP.

Two backends, chosen by name, never by branches in forward code:
- `local`: megatron-core's ColumnParallelLinear / RowParallelLinear and torch
  SDPA. Runs on CPU (tests, demo) and GPU.
- `te`: TransformerEngine's TEColumnParallelLinear / TERowParallelLinear (FP8
  capable) and TEDotProductAttention. Import-guarded; GPU only.

How each layer is split (read top to bottom):
    adaLN modulation (adaln, adaln_context, norm_out,  column-parallel, output gathered
      FLUX.2's shared stream modulations)
    QKV (linear_qkv, linear_added_qkv)                 column-parallel, rows per head -> heads split
    FLUX.2 single block linear_qkv_mlp                  column-parallel over [QKV per head | gate | up] (packed)
    QK RMS-norm                                         replicated (acts on head_dim), grads summed over TP
    attention core                                      local heads only
    attention out (linear_proj, linear_added_proj)     row-parallel
    MLP fc1 / fc2                                       column- / row-parallel (FLUX.2's SwiGLU fc1 packed [gate | up])
    single blocks' linear_proj                          row-parallel over [attn heads | MLP cols] (packed)
    embedders, proj_out, SD3 patch embed                replicated (small, or per sample)
The adaLN linears stay on megatron's own ColumnParallelLinear in both
backends: TE's column linear cannot gather its output, and these GEMMs have
one row per sample, so FP8 would not speed them up.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from .blocks import FluxSingleBlock, MMDiTBlock, MMDiTBlockSubmodules, SingleBlockSubmodules
from .layers import MLP, AttentionSubmodules, HeadRMSNorm, JointAttention, MLPSubmodules, SDPAttention


@dataclass(frozen=True)
class Backend:
    name: str
    column: type
    row: type
    core_attention: type
    qk_norm: type = HeadRMSNorm
    adaln_linear: type = ColumnParallelLinear


LOCAL = Backend("local", ColumnParallelLinear, RowParallelLinear, SDPAttention)


def te_backend() -> Backend:
    try:
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

        from .te import TECoreAttention
    except ImportError as e:
        raise RuntimeError(
            "model.spec=te needs TransformerEngine and a CUDA GPU (pip install -e '.[gpu]'); "
            f"import failed: {e}. Use model.spec=local on CPU."
        ) from None
    return Backend("te", TEColumnParallelLinear, TERowParallelLinear, TECoreAttention)


def get_backend(name: str) -> Backend:
    if name == "local":
        return LOCAL
    if name == "te":
        return te_backend()
    raise ValueError(f"unknown layer spec {name!r}; use 'local' or 'te'.")


def attention_spec(b: Backend, *, joint: bool, qk_norm: bool, out_proj: bool = True, context_out_proj: bool = True,
                   bias: bool = True) -> ModuleSpec:
    norm = b.qk_norm if qk_norm else None
    return ModuleSpec(
        module=JointAttention,
        params={"bias": bias},
        submodules=AttentionSubmodules(
            linear_qkv=b.column,
            core_attention=b.core_attention,
            q_layernorm=norm,
            k_layernorm=norm,
            linear_proj=b.row if out_proj else None,
            linear_added_qkv=b.column if joint else None,
            added_q_layernorm=norm if joint else None,
            added_k_layernorm=norm if joint else None,
            linear_added_proj=b.row if joint and context_out_proj else None,
        ),
    )


def mlp_spec(b: Backend) -> ModuleSpec:
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=b.column, linear_fc2=b.row))


def mmdit_block_spec(b: Backend, *, qk_norm: bool, context_pre_only: bool = False, dual_attention: bool = False) -> ModuleSpec:
    return ModuleSpec(
        module=MMDiTBlock,
        params={"context_pre_only": context_pre_only},
        submodules=MMDiTBlockSubmodules(
            adaln=b.adaln_linear,
            adaln_context=b.adaln_linear,
            attention=attention_spec(b, joint=True, qk_norm=qk_norm, context_out_proj=not context_pre_only),
            mlp=mlp_spec(b),
            mlp_context=None if context_pre_only else mlp_spec(b),
            attention2=attention_spec(b, joint=False, qk_norm=qk_norm) if dual_attention else None,
        ),
    )


def flux_single_block_spec(b: Backend) -> ModuleSpec:
    return ModuleSpec(
        module=FluxSingleBlock,
        submodules=SingleBlockSubmodules(
            adaln=b.adaln_linear,
            attention=attention_spec(b, joint=False, qk_norm=True, out_proj=False),
            linear_mlp_fc1=b.column,
            linear_proj=b.row,
        ),
    )


