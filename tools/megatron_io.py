"""Role checkpoints (the models/checkpoint_io.py format) written and read one tensor at a time.

`save_model` / `load_model` need a built model that holds every weight; a
converter must not. The writer drives torch.distributed.checkpoint, the engine
under megatron's torch_dist backend: planning runs on meta tensors and each
tensor is produced only when the storage writer asks for it
(`SavePlanner.resolve_data`), so one tensor group is in memory at a time. It
then adds what megatron's `dist_checkpointing.save` writes beside DCP's files
(metadata.json, common.pt) and the sidecar, last, as save_model does. The
reader loads single keys through DCP with the metadata parsed once.

Both pickle-based files in such a directory (DCP's `.metadata`, megatron's
`common.pt`) are written by torch / megatron code in their own formats; this
module writes no pickle of its own, and reads tensors with weights_only loads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_senseflow.models.checkpoint_io import META_NAME, StoredTensor, write_meta
from megatron_senseflow.models.configs import Arch

from .hf_io import ConversionError, PlannedTensor, fsync_tree

COMMON_NAME = "common.pt"  # megatron's `dist_checkpointing.load` reads it even when it holds nothing


class _LazySavePlanner(DefaultSavePlanner):
    """Plans on meta tensors; the real tensor for a key is made when the writer reaches it."""

    def __init__(self, produce: Callable[[str], torch.Tensor], planned: dict[str, PlannedTensor], progress=None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._produce, self._planned, self._progress = produce, planned, progress

    def resolve_data(self, write_item):
        key = write_item.index.fqn
        t = self._produce(key)
        want = self._planned[key]
        if tuple(t.shape) != want.shape or t.dtype != want.dtype:
            raise ConversionError(
                f"tensor {key} came out as {tuple(t.shape)} {t.dtype}, but the checkpoint plan says "
                f"{want.shape} {want.dtype}."
            )
        if self._progress is not None:
            self._progress.update(want.nbytes)
        return t.contiguous()


def write_role_checkpoint(
    directory: str | Path,
    arch: Arch,
    plan: list[PlannedTensor],
    produce: Callable[[str], torch.Tensor],
    progress=None,
) -> None:
    """Write a role checkpoint whose tensor `k` is `produce(k)`, called once per planned key, in plan order."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    planned = {t.key: t for t in plan}
    state = {t.key: torch.empty(t.shape, dtype=t.dtype, device="meta") for t in plan}
    # One file per tensor: DCP's writer keeps every tensor it wrote into a file referenced until that
    # file is closed (torch 2.13 `_write_files_from_queue`), so one file per rank would hold the whole
    # model. One writer thread: tensors are produced strictly one after another, in plan order. Files
    # are synced once at the end (fsync_tree), not one by one.
    writer = FileSystemWriter(str(directory), single_file_per_rank=False, thread_count=1, sync_files=False)
    dcp.save(state, storage_writer=writer, planner=_LazySavePlanner(produce, planned, progress), no_dist=True)
    save_config(CheckpointingConfig("torch_dist", 1, "torch", 1), str(directory))
    torch.save({}, directory / COMMON_NAME)
    fsync_tree(directory)  # the data is on disk before the sidecar says the checkpoint is complete
    by_size: dict[torch.dtype, int] = {}
    for t in plan:
        by_size[t.dtype] = by_size.get(t.dtype, 0) + t.nbytes
    write_meta(directory, arch, max(by_size, key=by_size.get))


class _CachedReader(FileSystemReader):
    """DCP reads `.metadata` on every load; parse it once for a per-tensor loop."""

    _metadata = None

    def read_metadata(self):
        if self._metadata is None:
            self._metadata = super().read_metadata()
        return self._metadata


class RoleCheckpointReader:
    """Stored tensors of one role checkpoint by key: shapes and dtypes up front, data one key at a time."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not (self.directory / ".metadata").is_file():
            raise ConversionError(
                f"{self.directory} has {META_NAME} but no .metadata, so its tensors were never fully written; "
                "convert or save it again."
            )
        self._reader = _CachedReader(str(self.directory))
        md = self._reader.read_metadata().state_dict_metadata
        self.tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            k: (tuple(v.size), v.properties.dtype) for k, v in md.items() if isinstance(v, TensorStorageMetadata)
        }

    def read(self, key: str) -> torch.Tensor:
        shape, dtype = self.tensors[key]
        out = {key: torch.empty(shape, dtype=dtype)}
        dcp.load(out, storage_reader=self._reader, planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
        return out[key]

    def read_canonical(self, stored: StoredTensor) -> torch.Tensor:
        """A canonical tensor, joining the parts a packed weight is stored as."""
        parts = [self.read(p.key) for p in stored.parts]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=stored.parts[0].dim)
