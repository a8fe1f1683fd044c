"""Input formats of `senseflow prepare-data`: what each one holds and how to read it.

Every source lists its work in a deterministic order (`units`), reads the
metadata of one unit in a worker process (`scan`: key, caption, image size,
aesthetic score, without decoding pixels) and later hands out image bytes for
a list of items (`read_images`). The policy (filters, duplicates) lives in
`data.write`, not here.

Aesthetic scores: img2dataset shards carry one in their per-sample JSON when
the download kept that column (`aesthetic`, `aesthetic_score` or
`AESTHETIC_SCORE`); a folder may put one in a same-named `.json`; the authors'
JSON may add an `aesthetic` list beside `prompts`. Anything else has no score,
and `--missing-aesthetic` decides what that means (default: keep it, and count it).
"""
from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from webdataset.tariterators import base_plus_ext

from megatron_senseflow.config import ConfigError

from . import bad
from .bad import Problem
from .imageops import IMAGE_EXTS, AbsurdImageSize, open_image

log = logging.getLogger(__name__)

AESTHETIC_FIELDS = ("aesthetic", "aesthetic_score", "AESTHETIC_SCORE")
SCAN_CHUNK = 256  # files per work unit when a source is a flat list of files


class SourceError(ConfigError):
    """An input that cannot be read at all, in one sentence that names it and the fix."""


@dataclass(frozen=True)
class SourceItem:
    key: str
    """Sample key in the output shards: the source key with characters webdataset splits on replaced."""
    source_key: str
    """The key (or relative path) as the source spelled it."""
    ref: str
    """Where the image bytes are: a file path, or 'TAR::MEMBER' inside an img2dataset shard."""
    caption: str | None
    width: int | None = None
    height: int | None = None
    aesthetic: float | None = None


@dataclass
class ScanResult:
    items: list[SourceItem] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def sanitize_key(key: str) -> str:
    """webdataset splits a member name at its first dot and at slashes; keep keys to [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", key) or "_"


def _clean_caption(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    return text or None


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _aesthetic(meta: dict) -> float | None:
    return next((_number(meta[k]) for k in AESTHETIC_FIELDS if _number(meta.get(k)) is not None), None)


def _probe(path: str) -> tuple[int, int]:
    with open_image(path) as img:  # reads the header only
        return img.size


def _scan_files(rows: list[tuple[str, str, str | None, float | None]]) -> ScanResult:
    """rows: (source_key, image path, caption, aesthetic); reads each image header for its size."""
    out = ScanResult()
    for source_key, path, caption, score in rows:
        try:
            w, h = _probe(path)
        except FileNotFoundError as e:
            out.problems.append(Problem(bad.UNREADABLE, path, str(e.strerror or e)))
            continue
        except AbsurdImageSize as e:
            out.problems.append(Problem(bad.ABSURD_SIZE, path, str(e)))
            continue
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            out.problems.append(Problem(bad.UNDECODABLE, path, f"{type(e).__name__}: {e}"))
            continue
        out.items.append(SourceItem(sanitize_key(source_key), source_key, path, caption, w, h, score))
    return out


def _read_files(items: list[SourceItem]) -> Iterator[tuple[SourceItem, bytes | Exception]]:
    for item in items:
        try:
            with open(item.ref, "rb") as f:
                yield item, f.read()
        except OSError as e:
            yield item, e


class JsonSource:
    """The SenseFlow authors' JSON: {"keys": [...], "image_paths": [...], "prompts": [...]} of equal lengths.

    Relative image paths are relative to the JSON file's folder.
    """

    def __init__(self, path: str):
        self.path = Path(path)
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise SourceError(f"cannot read {path} as JSON ({e}); pass the authors' JSON file to --input.") from None
        missing = [k for k in ("keys", "image_paths", "prompts") if not isinstance(doc.get(k), list)]
        if missing:
            raise SourceError(f"{path} lacks the list(s) {', '.join(missing)}; it must hold keys, image_paths and prompts.")
        lengths = {k: len(doc[k]) for k in ("keys", "image_paths", "prompts")}
        scores = doc.get("aesthetic")
        if scores is not None:
            lengths["aesthetic"] = len(scores)
        if len(set(lengths.values())) != 1:
            raise SourceError(f"{path} has lists of different lengths {lengths}; every list needs one entry per image.")
        base = self.path.parent
        self.rows = [
            (str(k), str(base / p), _clean_caption(c if isinstance(c, str) else None), _score(scores, i))
            for i, (k, p, c) in enumerate(zip(doc["keys"], doc["image_paths"], doc["prompts"]))
        ]

    def units(self) -> list:
        return [self.rows[i : i + SCAN_CHUNK] for i in range(0, len(self.rows), SCAN_CHUNK)]

    scan = staticmethod(_scan_files)
    read_images = staticmethod(_read_files)


def _score(scores: list | None, i: int) -> float | None:
    return None if scores is None else _number(scores[i])


class FolderSource:
    """A folder (searched recursively) of images with same-named .txt captions and optional .json metadata."""

    def __init__(self, root: str):
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"--input {root} is not a folder; --format folder needs a folder of images and .txt files.")
        paths = sorted(
            p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS
        )
        self.paths = [str(p) for p in paths]

    def units(self) -> list:
        return [self.paths[i : i + SCAN_CHUNK] for i in range(0, len(self.paths), SCAN_CHUNK)]

    def scan(self, unit: list[str]) -> ScanResult:
        rows = []
        for path in unit:
            p = Path(path)
            caption = p.with_suffix(".txt").read_text(errors="replace") if p.with_suffix(".txt").is_file() else None
            meta = _read_json_quietly(p.with_suffix(".json"))
            rows.append((str(p.relative_to(self.root).with_suffix("")), path, _clean_caption(caption), _aesthetic(meta)))
        return _scan_files(rows)

    read_images = staticmethod(_read_files)


def _read_json_quietly(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


class Img2DatasetSource:
    """img2dataset's webdataset output: NNNNN.tar files with jpg (or png/webp) + txt + json per sample.

    --input is the output folder of img2dataset (or one .tar file).
    """

    def __init__(self, path: str):
        p = Path(path)
        tars = sorted(p.rglob("*.tar")) if p.is_dir() else [p] if p.suffix == ".tar" else []
        if not tars:
            raise SourceError(f"no .tar files under {path}; --format img2dataset expects img2dataset's output folder.")
        self.tars = [str(t) for t in tars]

    def units(self) -> list:
        return list(self.tars)

    def scan(self, tar_path: str) -> ScanResult:
        out = ScanResult()
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            tf = tarfile.open(tar_path, "r:")
        except (tarfile.TarError, OSError) as e:
            out.problems.append(Problem(bad.UNREADABLE, tar_path, f"{type(e).__name__}: {e}"))
            return out
        with tf:
            try:
                for member in tf:
                    key, ext = base_plus_ext(member.name)
                    if member.isreg() and key is not None:
                        groups.setdefault(key, {})[ext.lower()] = member
            except (tarfile.TarError, EOFError, OSError) as e:
                out.problems.append(Problem(bad.TRUNCATED_TAR, tar_path, f"{type(e).__name__}: {e}"))
            for key, members in groups.items():
                where = f"{tar_path}::{key}"
                image = next((members[e] for e in IMAGE_EXTS if e in members), None)
                if image is None:
                    out.problems.append(Problem(bad.MISSING_IMAGE, where, "no jpg/png/webp member"))
                    continue
                try:
                    caption, meta = _read_member_texts(tf, members)
                except (tarfile.TarError, EOFError, OSError) as e:
                    out.problems.append(Problem(bad.TRUNCATED_TAR, where, f"{type(e).__name__}: {e}"))
                    continue
                w, h = meta.get("width"), meta.get("height")
                size_known = isinstance(w, int) and isinstance(h, int)
                out.items.append(
                    SourceItem(
                        sanitize_key(os.path.basename(key)),
                        key,
                        f"{tar_path}::{image.name}",
                        _clean_caption(caption),
                        w if size_known else None,
                        h if size_known else None,
                        _aesthetic(meta),
                    )
                )
        lost = _expected_successes(tar_path) - len(groups)
        if lost > 0:  # a tar cut at a header boundary reads as a clean end; img2dataset's stats tell
            out.problems.append(Problem(bad.TRUNCATED_TAR, tar_path, "samples missing against its _stats.json", lost))
        return out

    @staticmethod
    def read_images(items: list[SourceItem]) -> Iterator[tuple[SourceItem, bytes | Exception]]:
        by_tar: dict[str, list[SourceItem]] = {}
        for item in items:
            by_tar.setdefault(item.ref.split("::", 1)[0], []).append(item)
        for tar_path, group in by_tar.items():
            try:
                tf = tarfile.open(tar_path, "r:")
            except (tarfile.TarError, OSError) as e:
                for item in group:
                    yield item, e
                continue
            with tf:
                for item in group:
                    try:
                        f = tf.extractfile(item.ref.split("::", 1)[1])
                        yield item, f.read()
                    except (tarfile.TarError, OSError, KeyError, EOFError) as e:
                        yield item, e


def _expected_successes(tar_path: str) -> int:
    stats = _read_json_quietly(Path(tar_path[: -len(".tar")] + "_stats.json"))
    n = stats.get("successes")
    return n if isinstance(n, int) else 0


def _read_member_texts(tf: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> tuple[str | None, dict]:
    caption = None
    meta: dict = {}
    if "txt" in members:
        caption = tf.extractfile(members["txt"]).read().decode("utf-8", errors="replace")
    if "json" in members:
        try:
            doc = json.loads(tf.extractfile(members["json"]).read())
            meta = doc if isinstance(doc, dict) else {}
        except ValueError:
            meta = {}
    return caption, meta


SOURCES = {"json": JsonSource, "folder": FolderSource, "img2dataset": Img2DatasetSource}


def open_source(fmt: str, path: str):
    if fmt not in SOURCES:
        raise SourceError(f"--format {fmt!r} is unknown; choose one of {', '.join(SOURCES)}.")
    return SOURCES[fmt](path)
