"""What FLUX and SD3 share beyond blocks: pipeline stages, global parameter names, checkpoints.

Canonical state dict: the parameters a TP=1, PP=1 model would hold, keyed by
global block index (`double_blocks.17.mlp.linear_fc1.weight`). It is the one
format the diffusers mapping (`models/hf_mapping.py`) speaks; every TP/PP
layout derives its local tensors from it with `local_from_canonical`, and
distributed checkpoints store the same tensors (`sharded_state_dict`), so a
checkpoint written at one layout loads at any other.

How a local tensor relates to its canonical one is read off the parameter:
megatron's parallel linears set `tensor_model_parallel` and `partition_dim`;
a packed weight (FLUX single-block projection) also carries `packed_split`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule


@dataclass(frozen=True)
class StageLayout:
    """Blocks [first, last) of the global block list on this pipeline stage."""

    first: int
    last: int
    pre_process: bool
    post_process: bool


def packed_part_names(param: torch.Tensor) -> tuple[str, ...]:
    """Names of a packed weight's parts in checkpoints (`key/<name>`): `packed_names` when the layer sets them,
    else FLUX.1's single-block [attention | MLP] input."""
    return getattr(param, "packed_names", None) or ("attn", "mlp")[: len(param.packed_split)]


class DiTBase(MegatronModule):
    """Common machinery; subclasses define `block_offsets()` (global index of the first local block per ModuleList)."""

    def __init__(self, config: TransformerConfig, layout: StageLayout):
        super().__init__(config)
        from megatron.core.enums import ModelType

        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        # read by finalize_model_grads: no word embedding is tied across our stages
        self.share_embeddings_and_output_weights = False
        self.layout = layout
        self.pre_process = layout.pre_process
        self.post_process = layout.post_process
        self.input_tensor: torch.Tensor | None = None

    # ---- pipeline hook used by megatron's schedules
    def set_input_tensor(self, input_tensor):
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def block_offsets(self) -> dict[str, int]:
        """ModuleList name -> global index of its first local entry."""
        raise NotImplementedError

    # ---- the output head both families share (diffusers AdaLayerNormContinuous + proj_out)
    def init_output_head(self, out_dim: int, adaln_linear, bias: bool = True) -> None:
        """`norm_out` (adaLN, chunks (scale, shift)) and a zero-initialised `proj_out`, on the last stage."""
        from .layers import AdaLNModulation, replicated_linear

        hidden = self.config.hidden_size
        self.norm_out = AdaLNModulation(self.config, hidden, 2, adaln_linear, sharded_tokens=False, bias=bias)
        self.proj_out = replicated_linear(hidden, out_dim, self.config, bias)
        torch.nn.init.zeros_(self.proj_out.weight)
        if bias:
            torch.nn.init.zeros_(self.proj_out.bias)

    def output_head(self, img_SBH: torch.Tensor, c_BH: torch.Tensor) -> torch.Tensor:
        """Image tokens (gathered if sequence parallel) -> per-token outputs [S, B, out_dim]."""
        from .layers import layer_norm, modulate, sp_gather

        img = sp_gather(img_SBH, self.config)
        scale, shift = self.norm_out(c_BH)
        return self.proj_out(modulate(layer_norm(img), shift, scale))

    def global_name(self, local_name: str) -> str:
        offsets = self.block_offsets()
        m = re.match(r"^(\w+)\.(\d+)\.(.*)$", local_name)
        if m and m.group(1) in offsets:
            return f"{m.group(1)}.{int(m.group(2)) + offsets[m.group(1)]}.{m.group(3)}"
        return local_name

    def tensors(self):
        """(local name, tensor) for every parameter and persistent buffer (not TE/FP8 extra state); of a model
        with LoRA adapters (models/lora.py) only the adapters: its base is another role's frozen weights."""
        lora = getattr(self, "lora_spec", None) is not None
        return [(k, v) for k, v in self.state_dict(keep_vars=True).items()
                if not k.endswith("_extra_state") and (not lora or ".lora." in k)]

    # ---- canonical <-> local
    def local_from_canonical(self, canonical: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
        """Copy this rank's slices of a canonical state dict into the model; returns the keys used."""
        tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        used, missing = [], []
        with torch.no_grad():
            for name, t in self.tensors():
                key = self.global_name(name)
                if key not in canonical:
                    missing.append(key)
                    continue
                t.copy_(local_slice(t, canonical[key], tp_rank, tp))
                used.append(key)
        if strict and missing:
            raise KeyError(f"canonical state dict lacks {len(missing)} tensors, e.g. {missing[:5]}")
        return used

    def canonical_keys(self) -> list[str]:
        return [self.global_name(n) for n, _ in self.tensors()]

    # ---- distributed checkpoint
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        pp_rank = ps.get_pipeline_model_parallel_rank()
        dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
        out = {}
        for name, t in self.tensors():
            key = prefix + self.global_name(name)
            split = getattr(t, "tensor_model_parallel", False)
            # one writer per tensor: replica (0, 0, 0) saves; PP-replicated embedders count pp_rank
            pp_rep = pp_rank if getattr(t, "pipeline_parallel", False) else 0
            replica_id = (pp_rep, 0 if split else tp_rank, dp_rank)
            if split and getattr(t, "packed_split", None):
                out[prefix + name] = _packed_factory(key, t, tp_rank, tp, replica_id)
            elif split:
                out[prefix + name] = ShardedTensor.from_rank_offsets(
                    key, t, (t.partition_dim, tp_rank, tp), replica_id=replica_id
                )
            else:
                out[prefix + name] = ShardedTensor.from_rank_offsets(key, t, replica_id=replica_id)
        return out


def local_slice(local: torch.Tensor, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's part of a canonical tensor, following the parameter's TP attributes."""
    if not getattr(local, "tensor_model_parallel", False) or tp == 1:
        part = full
    else:
        axis = local.partition_dim
        sizes = getattr(local, "packed_split", None) or (full.shape[axis],)
        pieces = full.split(list(sizes), dim=axis)
        part = torch.cat([p.chunk(tp, dim=axis)[tp_rank] for p in pieces], dim=axis)
    if part.shape != local.shape:
        raise ValueError(f"shape mismatch: canonical slice {tuple(part.shape)} vs parameter {tuple(local.shape)}")
    return part


def _packed_factory(key: str, param: torch.Tensor, tp_rank: int, tp: int, replica_id) -> ShardedTensorFactory:
    """Store a packed weight's per-rank parts (e.g. [W_attn[:, r] | W_mlp[:, r]]) as TP-independent tensors
    `key/<part>` (`key/attn`, `key/mlp`)."""
    axis = param.partition_dim
    local_sizes = [s // tp for s in param.packed_split]
    names = packed_part_names(param)

    def build(k, t, rep, flattened_range):
        assert flattened_range is None, "packed weights are not flattened"
        parts = t.split(local_sizes, dim=axis)
        return {
            n: ShardedTensor.from_rank_offsets(f"{k}/{n}", p, (axis, tp_rank, tp), replica_id=rep)
            for n, p in zip(names, parts)
        }

    def merge(sub):
        return torch.cat([sub[n] for n in names], dim=axis)

    return ShardedTensorFactory(key, param, build, merge, replica_id)
