"""Decoding one shard sample into arrays, with every check that makes a bad sample a counted skip.

Members are decoded by extension from a fixed table: images by PIL, `.txt`
as UTF-8, and `.npy` by numpy with allow_pickle=False. Nothing else is ever
decoded (webdataset's default decoder would unpickle `.pyd` and torch-load
`.pth`); such members are reported as unknown and left alone.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_senseflow.config import ConfigError, DataConfig

from . import bad
from .imageops import IMAGE_EXTS, AbsurdImageSize, Buckets, load_rgb, open_image, resize_center_crop, to_chw_uint8
from .shards import ShardSet

MAX_MEMBER_BYTES = 1 << 30  # one member above 1 GiB is not an image or an embedding of ours
IMAGE_SHARD_KEYS = frozenset(IMAGE_EXTS) | {"txt", "json"}  # the members of a sample the writer makes


class Skip(Exception):
    """Raised for a sample that must be skipped; reason is a `data.bad` name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SampleSpec:
    """What a sample must hold, read from DataConfig and the manifest."""

    buckets: Buckets
    want_image: bool
    arrays: tuple[tuple[str, str, tuple[int | None, ...]], ...] = ()
    """(batch name, member, expected shape; None = any) for the .npy members, latent first."""
    latent_scale: int = 8
    """Image pixels per latent pixel (the VAE's downsampling factor)."""
    known: frozenset[str] = frozenset()
    """Member extensions that are ours; any other member is reported as unknown and never decoded."""

    def decode(self, sample) -> dict[str, Any]:
        """prompt, the .npy arrays, and the image as uint8 [3, H, W]; raises Skip for a bad sample."""
        m = sample.members
        big = [ext for ext, v in m.items() if len(v) > MAX_MEMBER_BYTES]
        if big:
            raise Skip(bad.ABSURD_SIZE, f"member {big[0]} holds {len(m[big[0]])} bytes")
        out: dict[str, Any] = {"prompt": _caption(m)}
        for name, member, shape in self.arrays:
            out[name] = _array(m, member, shape)
        if self.arrays:
            _, h, w = out["latent"].shape
            target = (w * self.latent_scale, h * self.latent_scale)
            if target not in self.buckets.sizes:
                raise Skip(bad.BAD_SHAPE, f"latent {h}x{w} decodes to {target[0]}x{target[1]} px, not a size of these shards")
        else:
            target = None
        if self.want_image:
            out["image"] = _image(m, self.buckets, target)
        return out


def _caption(m: dict[str, bytes]) -> str:
    if "txt" not in m:
        raise Skip(bad.MISSING_CAPTION, "no .txt member")
    try:
        text = m["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise Skip(bad.UNDECODABLE, f"caption is not UTF-8: {e}") from None
    if not text:
        raise Skip(bad.MISSING_CAPTION, "empty caption")
    return text


def _image(m: dict[str, bytes], buckets: Buckets, target: tuple[int, int] | None) -> np.ndarray:
    ext = next((e for e in IMAGE_EXTS if e in m), None)
    if ext is None:
        raise Skip(bad.MISSING_IMAGE, "no jpg/png/webp member")
    try:
        img = open_image(m[ext])
        target = target or buckets.size_for(*img.size)
        return to_chw_uint8(resize_center_crop(load_rgb(img, need=target), target))
    except AbsurdImageSize as e:
        raise Skip(bad.ABSURD_SIZE, str(e)) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken images
        raise Skip(bad.UNDECODABLE, f"{ext}: {type(e).__name__}: {e}") from None


def _array(m: dict[str, bytes], member: str, shape: tuple[int | None, ...]) -> np.ndarray:
    if member not in m:
        raise Skip(bad.MISSING_FIELD, f"no {member} member")
    try:
        arr = np.load(io.BytesIO(m[member]), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError/EOFError/... for broken .npy
        raise Skip(bad.UNDECODABLE, f"{member}: {type(e).__name__}: {e}") from None
    if not np.issubdtype(arr.dtype, np.floating) or arr.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(arr.shape, shape)
    ):
        want = "x".join("?" if s is None else str(s) for s in shape)
        raise Skip(bad.BAD_SHAPE, f"{member} is {arr.dtype} {list(arr.shape)}, expected float {want}")
    if not np.isfinite(arr).all():
        raise Skip(bad.NON_FINITE, f"{member} holds NaN or inf")
    return arr  # in its stored dtype: float16 text embeddings cross to the main process at half the size


def sample_spec(cfg: DataConfig, shards: ShardSet) -> SampleSpec:
    """Check DataConfig against the manifest and say what every sample must hold."""
    man = shards.manifest
    ratios = tuple(man.get("ratios", (1.0,)))
    enc = man.get("encoder")
    keys = IMAGE_SHARD_KEYS | ({enc["latent_key"], enc["text_key"], enc["pooled_key"]} if enc else set())
    if not cfg.encoded:
        return SampleSpec(Buckets(cfg.resolution, ratios), want_image=True, known=keys)
    if man.get("kind") != "encoded":
        raise ConfigError(
            f"data.path={cfg.path} holds image shards but data.encoded=true; "
            f"run `senseflow prepare-data --encode` on them or set data.encoded=false."
        )
    if man["resolution"] != cfg.resolution:
        raise ConfigError(
            f"the shards in {cfg.path} were encoded at {man['resolution']} px but data.resolution={cfg.resolution}; "
            f"set data.resolution={man['resolution']} or encode again."
        )
    length, width = enc["text_shape"]
    if length != cfg.text_max_length:
        raise ConfigError(
            f"the shards in {cfg.path} hold {length} text tokens per prompt but data.text_max_length="
            f"{cfg.text_max_length}; set data.text_max_length={length} or encode again."
        )
    arrays = (
        ("latent", enc["latent_key"], (enc["latent_channels"], None, None)),
        ("text", enc["text_key"], (length, width)),
        ("pooled", enc["pooled_key"], (enc["pooled_dim"],)),
    )
    return SampleSpec(
        Buckets(cfg.resolution, ratios),
        want_image=cfg.real_images,
        arrays=arrays,
        latent_scale=enc["vae_scale_factor"],
        known=keys,
    )
