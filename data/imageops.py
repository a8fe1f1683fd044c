"""Image decoding with sanity bounds, resize + centre crop, and aspect buckets.

The writer and the loader share these so that an image the loader has to
resize (shards written at another resolution, or plain img2dataset shards)
goes through exactly the transform the writer would have applied.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Sides outside these bounds are not photographs we can train on: icons, banners,
# or a decompression bomb whose header promises gigapixels.
MIN_SIDE = 16
MAX_SIDE = 16384
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # where PIL itself refuses to decode
SIZE_MULTIPLE = 64
ORIENTATION = 0x0112  # EXIF tag  # bucket sides stay divisible by VAE factor x patch size of every family


class AbsurdImageSize(ValueError):
    """An image whose header gives sides outside [MIN_SIDE, MAX_SIDE] or too many pixels."""


def check_size(img: Image.Image) -> Image.Image:
    w, h = img.size
    if min(w, h) < MIN_SIDE or max(w, h) > MAX_SIDE or w * h > MAX_PIXELS:
        raise AbsurdImageSize(f"{w}x{h} px is outside {MIN_SIDE}..{MAX_SIDE} px per side")
    return img


def open_image(data: bytes | str) -> Image.Image:
    """Open image bytes or a path (header only) and check the size before any pixel is decoded."""
    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    except Image.DecompressionBombError as e:  # PIL refuses in open() already
        raise AbsurdImageSize(str(e)) from None
    return check_size(img)


def load_rgb(img: Image.Image, need: tuple[int, int] | None = None) -> Image.Image:
    """Decode to RGB, honouring EXIF rotation; transparent pixels become white, not black."""
    if need is not None and img.format == "JPEG":
        img.draft("RGB", _cover_size(img.size, need))  # DCT-domain downscale: 2-8x faster on big JPEGs
    if img.getexif().get(ORIENTATION, 1) != 1:  # exif_transpose copies even when nothing turns
        img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _cover_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    scale = max(target[0] / size[0], target[1] / size[1])
    return max(1, math.ceil(size[0] * scale)), max(1, math.ceil(size[1] * scale))


def resize_center_crop(img: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Scale so the image covers `target` (w, h), then cut the centre."""
    if img.size == target:
        return img
    w, h = _cover_size(img.size, target)
    img = img.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - target[0]) // 2, (h - target[1]) // 2
    return img.crop((left, top, left + target[0], top + target[1]))


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def to_chw_uint8(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


@dataclass(frozen=True)
class Buckets:
    """Output sizes: one per aspect ratio, each with about resolution^2 pixels.

    With the single ratio 1.0 this is the plain square centre crop; a list of
    ratios gives aspect buckets, and every image goes to the bucket whose
    ratio is closest to its own (in log space, so 2:1 and 1:2 are equally far
    from 1:1).
    """

    resolution: int
    ratios: tuple[float, ...] = (1.0,)

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._size(r) for r in self.ratios)

    def _size(self, ratio: float) -> tuple[int, int]:
        if ratio == 1.0:
            return self.resolution, self.resolution
        area = self.resolution * self.resolution
        w = _round_to(math.sqrt(area * ratio), SIZE_MULTIPLE)
        h = _round_to(math.sqrt(area / ratio), SIZE_MULTIPLE)
        return w, h

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        aspect = math.log(width / height)
        best = min(self.ratios, key=lambda r: abs(math.log(r) - aspect))
        return self._size(best)


def _round_to(x: float, m: int) -> int:
    return max(m, int(round(x / m)) * m)


def parse_ratios(text: str | None) -> tuple[float, ...]:
    """'1:1,4:3,3:4' -> (1.0, 1.333.., 0.75); None or '' -> square only."""
    if not text:
        return (1.0,)
    ratios = []
    for part in text.split(","):
        try:
            w, h = (float(x) for x in part.strip().split(":"))
            if w <= 0 or h <= 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"aspect bucket {part.strip()!r} is not W:H with positive numbers, e.g. 4:3.") from None
        ratios.append(w / h)
    return tuple(dict.fromkeys(ratios))
