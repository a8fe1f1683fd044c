"""Diffusers weight directories on disk: find them, read tensors one at a time, write shards as tensors arrive.

`safetensors.torch.save_file` and diffusers' `save_pretrained` take a whole
state dict (24 GB for FLUX.1-dev). Here every tensor is planned up front
(names, shapes, dtypes come from the mapping), so each shard's header can be
written first and each tensor streamed into place and dropped. Reads open the
shard per tensor: a `safe_open` handle kept for a whole shard keeps every page
it touched mapped, and the process' resident memory would grow to the shard.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from megatron_senseflow.errors import UserError

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
CONFIG_NAME = "config.json"
MAX_LISTED = 8  # names shown in one error message

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class ConversionError(UserError):
    """Input a conversion cannot use, said in one sentence that names the value and the fix."""


def listed(names, limit: int = MAX_LISTED) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def parse_size(text: str | int) -> int:
    """'10GB' -> 10**9 * 10 bytes (decimal units as in diffusers / huggingface_hub; 'GiB' is binary)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConversionError(f"size {text!r} is not understood; write it like 500MB, 10GB or 2GiB.")
    unit = (m.group(2) or "").upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base**power)


def find_transformer_dir(path: str | Path) -> Path:
    """A diffusers transformer directory, or the `transformer/` subfolder of a pipeline directory."""
    p = Path(path)
    if not p.is_dir():
        raise ConversionError(f"{p} is not a directory; point --hf at a diffusers pipeline or transformer folder.")
    if (p / CONFIG_NAME).is_file() and not (p / "model_index.json").is_file():
        return p
    if (p / "transformer" / CONFIG_NAME).is_file():
        return p / "transformer"
    raise ConversionError(
        f"{p} is neither a diffusers transformer directory (config.json + safetensors) nor a pipeline "
        "directory with a transformer/ subfolder; point --hf at e.g. the FLUX.1-dev download or its transformer/."
    )


def read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path} cannot be read as JSON ({e}); re-download the model or fix the file.") from None
    if not isinstance(cfg, dict) or "_class_name" not in cfg:
        raise ConversionError(f"{path} has no _class_name, so it is not a diffusers model config.")
    return cfg


def fsync_tree(directory: str | Path) -> None:
    """Flush every file under `directory` to disk, then the directories (once, at the end of a conversion:
    per-file syncs while writing would stall on the disk instead of letting the kernel flush alongside)."""
    for root, dirs, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 1 << 30:
                raise ValueError(f"header length {n}")
            return json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path} is not a readable safetensors file ({e}); re-download that shard.") from None


class SafetensorsDir:
    """The weights of one diffusers model directory: names, shapes and dtypes up front, data on demand."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index, single = self.directory / INDEX_NAME, self.directory / WEIGHTS_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ConversionError(f"{index} is not a safetensors index ({e}); re-download it.") from None
            files = sorted(set(weight_map.values()))
            absent = [f for f in files if not (self.directory / f).is_file()]
            if absent:
                raise ConversionError(f"{index} lists shard(s) {listed(absent)} that are not in {self.directory}; "
                                      "the download is incomplete, fetch the missing shards.")
        elif single.is_file():
            weight_map, files = None, [WEIGHTS_NAME]
        else:
            found = sorted(p.name for p in self.directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
            hint = (f" (found {listed(found)}; .bin/.pt weights are pickles: load them once in diffusers and "
                    "save_pretrained(..., safe_serialization=True))") if found else ""
            raise ConversionError(f"{self.directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME}{hint}.")
        self.info: dict[str, TensorInfo] = {}
        for name in files:
            path = self.directory / name
            for key, entry in read_header(path).items():
                if key == "__metadata__":
                    continue
                if entry["dtype"] not in _DTYPES:
                    raise ConversionError(f"{path}: tensor {key} has dtype {entry['dtype']}, which torch cannot hold.")
                self.info[key] = TensorInfo(path, tuple(entry["shape"]), _DTYPES[entry["dtype"]])
        if weight_map is not None:
            wrong = [k for k, f in weight_map.items() if k not in self.info or self.info[k].file.name != f]
            if wrong:
                raise ConversionError(f"{index} places {listed(wrong)} in shards that do not hold them; "
                                      "the index and the shards come from different downloads.")

    def get(self, key: str) -> torch.Tensor:
        with safe_open(self.info[key].file, framework="pt") as f:
            return f.get_tensor(key)

    def get_part(self, key: str, dim: int, start: int, length: int) -> torch.Tensor:
        """A slice along `dim` without reading the rest of the tensor."""
        with safe_open(self.info[key].file, framework="pt") as f:
            index = [slice(None)] * dim + [slice(start, start + length)]
            return f.get_slice(key)[tuple(index)].contiguous()


@dataclass(frozen=True)
class PlannedTensor:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Fill shards in order, as huggingface_hub does: a tensor larger than the limit gets a shard of its own."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(num: int) -> list[str]:
    if num == 1:
        return [WEIGHTS_NAME]
    stem, ext = WEIGHTS_NAME.rsplit(".", 1)
    return [f"{stem}-{i + 1:05d}-of-{num:05d}.{ext}" for i in range(num)]


class ShardedSafetensorsWriter:
    """Writes a planned list of tensors, in plan order, into diffusers-named shards plus the index.

    Each shard's header is written when the shard is opened (every shape and
    dtype is known from the plan), then each tensor's bytes as it arrives, so
    only the tensor being written is in memory.
    """

    def __init__(self, directory: str | Path, plan: list[PlannedTensor], max_shard_bytes: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shards = plan_shards(plan, max_shard_bytes)
        self.names = shard_names(len(self.shards))
        self._queue = [(i, t) for i, shard in enumerate(self.shards) for t in shard]
        self._pos = 0
        self._file = None
        self._shard = -1

    def _open(self, shard: int) -> None:
        if self._file is not None:
            self._file.close()
        header, offset = {}, 0
        for t in self.shards[shard]:
            header[t.key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as safetensors itself does
        self._file = open(self.directory / self.names[shard], "wb")
        self._file.write(len(blob).to_bytes(8, "little"))
        self._file.write(blob)
        self._shard = shard

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._queue):
            raise RuntimeError(f"tensor {key} was not planned")
        shard, want = self._queue[self._pos]
        if key != want.key or tuple(tensor.shape) != want.shape or tensor.dtype != want.dtype:
            raise RuntimeError(
                f"writing {key} {tuple(tensor.shape)} {tensor.dtype}, but the plan expects "
                f"{want.key} {want.shape} {want.dtype} next"
            )
        if shard != self._shard:
            self._open(shard)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._pos += 1

    def close(self) -> None:
        if self._pos != len(self._queue):
            raise RuntimeError(f"{len(self._queue) - self._pos} planned tensors were never written")
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s)},
                "weight_map": {t.key: name for name, s in zip(self.names, self.shards) for t in s},
            }
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
