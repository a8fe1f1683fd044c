"""One model in one megatron-core distributed checkpoint directory (a "role checkpoint").

Layout of DIR:
    DIR/senseflow_model.json    {"format": 1, "arch": {...}, "dtype": "bfloat16"}  (written last)
    DIR/...                     megatron dist_checkpointing files (torch_dist), keys = canonical keys

Keys are the canonical names of models/base.py (global block indices, TP=1
shapes), so a directory written at one TP/PP layout loads at any other; the
converters write the same format from diffusers weights. The JSON sidecar
lets a load refuse another architecture with one sentence instead of a
shape error from deep inside torch.distributed.checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_senseflow.errors import UserError
from megatron_senseflow.mcore_compat import dist_save

from .base import DiTBase, StageLayout, packed_part_names
from .configs import Arch, arch_from_dict, arch_to_dict

META_NAME = "senseflow_model.json"
FORMAT = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded into the requested model, in one sentence."""


def lora_meta(model) -> dict | None:
    """What a checkpoint of adapters needs besides its tensors: the adapters' shape and the base they adapt."""
    spec = getattr(model, "lora_spec", None)
    if spec is None:
        return None
    return {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets), "base": getattr(model, "lora_base", None)}


def write_meta(directory: str | Path, arch: Arch, dtype: torch.dtype, lora: dict | None = None) -> None:
    meta = {"format": FORMAT, "arch": arch_to_dict(arch), "dtype": str(dtype).replace("torch.", "")}
    if lora is not None:
        meta["lora"] = lora  # the directory holds adapters only (models/lora.py)
    path = Path(directory) / META_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path)


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{directory} is not a senseflow model checkpoint (no {META_NAME}); "
            "convert diffusers weights with `senseflow convert import` first."
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}); the checkpoint is damaged: convert or save it again.") \
            from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path} has format {found}, this build reads format {FORMAT}.")
    return meta


def checkpoint_arch(directory: str | Path) -> Arch:
    """The architecture a role checkpoint records (the one reader of senseflow_model.json, with its checks)."""
    from .arch_base import ArchError

    meta = read_meta(directory)
    try:
        return arch_from_dict(meta["arch"])
    except ArchError as e:
        raise CheckpointError(f"{Path(directory) / META_NAME}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(directory) / META_NAME} does not describe an architecture ({e!r}); the "
                              "checkpoint is damaged: convert or save it again.") from None


def check_arch(directory: str | Path, arch: Arch, allow_guidance_drop: bool = False) -> None:
    """Refuse a checkpoint of another architecture, naming the first field that differs."""
    saved = arch_to_dict(checkpoint_arch(directory))
    want = arch_to_dict(arch)
    for k in sorted(set(saved) | set(want)):
        if saved.get(k) == want.get(k):
            continue
        if allow_guidance_drop and k == "guidance_embeds" and saved.get(k) and not want.get(k):
            continue  # the SenseFlow FLUX student is FLUX.1-dev without its guidance embedder
        raise CheckpointError(
            f"{directory} holds a {saved['family']} model with {k}={saved.get(k)!r}, "
            f"but this run builds {want['family']} with {k}={want.get(k)!r}; check model.preset / model.arch."
        )


def save_model(model: DiTBase, arch: Arch, directory: str | Path, async_save: bool = False) -> list:
    """Collective over all ranks that hold parts of the model. With `async_save` the tensors are written by
    the returned megatron-core AsyncRequest (the caller schedules and finalizes it); else nothing is returned."""
    directory = Path(directory)
    if not dist.is_initialized() or dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    request = dist_save(model.sharded_state_dict(), str(directory), async_save)
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_meta(directory, arch, next(model.parameters()).dtype, lora_meta(model))
    if dist.is_initialized():
        dist.barrier()
    return [request] if async_save else []


def load_model(model: DiTBase, arch: Arch, directory: str | Path, allow_guidance_drop: bool = False) -> None:
    """Load a role checkpoint into this rank's part of `model` (any TP/PP layout)."""
    check_arch(directory, arch, allow_guidance_drop)
    saved_lora, want_lora = read_meta(directory).get("lora"), lora_meta(model)
    if saved_lora and not want_lora:
        raise CheckpointError(f"{directory} holds LoRA adapters (rank {saved_lora['rank']}) over the base "
                              f"{saved_lora.get('base')}, not full weights; load it with its base "
                              f"(`senseflow sample --lora {directory}`, `senseflow export --lora` or `--merge`).")
    if want_lora and not saved_lora:
        raise CheckpointError(f"{directory} holds full weights, but this model expects LoRA adapters.")
    # keys the model does not ask for (a dropped guidance embedder) are simply not read
    loaded = dist_checkpointing.load(model.sharded_state_dict(), str(directory))
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    wanted = {k for k, _ in model.tensors()}  # a LoRA model asks for its adapters only
    missing = [k for k in missing if k in wanted]
    if missing or unexpected:
        raise CheckpointError(f"{directory}: missing {missing[:5]}, unexpected {unexpected[:5]} after load.")


def load_trained(model: DiTBase, arch: Arch, directory: str | Path, base: str | Path | None = None) -> None:
    """A trained role into a plain model: full weights as load_model, or a LoRA run's adapters over their base
    (`base`, else the base the checkpoint records), attaching the adapters to `model`."""
    info = read_meta(directory).get("lora")
    if not info:
        load_model(model, arch, directory)
        return
    from .lora import add_lora, spec_from_meta

    base = base or info.get("base")
    if not base:
        raise CheckpointError(f"{directory} holds LoRA adapters whose run had a random teacher (no base checkpoint "
                              f"recorded); pass the base with --base DIR.")
    load_model(model, arch, base, allow_guidance_drop=True)
    add_lora(model, spec_from_meta(info), arch.attention_head_dim)
    load_model(model, arch, directory)


@dataclass(frozen=True)
class StoredPart:
    """One tensor in the checkpoint: `key`, its `shape`, and where it sits in its canonical tensor."""

    key: str
    shape: tuple[int, ...]
    dim: int
    start: int


@dataclass(frozen=True)
class StoredTensor:
    """A canonical tensor (TP=1 shape) and the checkpoint tensor(s) that hold it, in order along `parts[0].dim`."""

    key: str
    shape: tuple[int, ...]
    parts: tuple[StoredPart, ...]


def checkpoint_layout(arch: Arch, lora=None) -> dict[str, StoredTensor]:
    """What `save_model` writes for `arch`: canonical key -> global shape and checkpoint key(s).

    Read off the whole model built on the meta device (no memory, well under a
    second for FLUX.1-dev), from the same parameter attributes that
    `DiTBase.sharded_state_dict` uses, so a converter that writes or reads a
    role checkpoint without building the model agrees with save_model /
    load_model by construction. Needs megatron parallel_state (any TP size).
    """
    from megatron.core import parallel_state as ps

    from .build import build_model, transformer_config

    tp = ps.get_tensor_model_parallel_world_size()
    with torch.device("meta"):
        model = build_model(arch, transformer_config(arch, tp=tp), layout=StageLayout(0, arch.num_blocks, True, True))
        if lora is not None:  # models.lora.LoRASpec: a checkpoint of adapters
            from .lora import add_lora

            add_lora(model, lora, arch.attention_head_dim)
    out: dict[str, StoredTensor] = {}
    for name, t in model.tensors():
        key = model.global_name(name)
        shape = list(t.shape)
        split = getattr(t, "tensor_model_parallel", False)
        if split:
            shape[t.partition_dim] *= tp
        packed = getattr(t, "packed_split", None) if split else None
        if packed:
            parts, start = [], 0
            for part_name, size in zip(packed_part_names(t), packed):
                part_shape = list(shape)
                part_shape[t.partition_dim] = size
                parts.append(StoredPart(f"{key}/{part_name}", tuple(part_shape), t.partition_dim, start))
                start += size
        else:
            parts = [StoredPart(key, tuple(shape), 0, 0)]
        out[key] = StoredTensor(key, tuple(shape), tuple(parts))
    return out
