"""Shard files: reading tars sample by sample, writing them atomically, manifests, resumable output folders.

A shard is a plain webdataset tar: the members of one sample sit next to
each other and share a key (`000123.jpg`, `000123.txt`, `000123.json`).
Samples are numbered from 0 in tar order; the loader's resume position and
the manifest's counts are in those numbers.

An output folder is written by independent jobs (one per planned shard, or
one per input shard when encoding). A job writes its tars under temporary
names, renames them into place, and only then writes its record under
`_progress/`; `manifest.json` is assembled from the records when every job
has one. A rerun after a crash therefore redoes exactly the jobs without a
record, and overwrites whatever half-finished files they left, so nothing
is written twice or lost. The loader reads only shards the manifest lists.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix
from webdataset.writer import TarWriter

from megatron_senseflow.config import ConfigError

from . import bad

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PROGRESS = "_progress"
FORMAT = "senseflow-shards"
VERSION = 1
TAR_BLOCK = 512
META_NAME = re.compile(rf"{meta_prefix}[^/]*{meta_suffix}($|/)")  # webdataset's metadata members, skipped as it does


class ShardError(ConfigError):
    """A shard folder that cannot be used, in one sentence that names it and the fix."""


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- reading


@dataclass
class TarSample:
    index: int
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    notes: list[tuple[str, str]] = field(default_factory=list)
    """(reason, member) for members that were not kept: duplicates or names without an extension."""


class ShardReadError(Exception):
    """A shard that broke after `index` complete samples (reason is a `data.bad` name)."""

    def __init__(self, index: int, reason: str, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.index = index
        self.reason = reason


def iter_samples(url: str) -> Iterator[TarSample]:
    """The samples of one tar in order; raises ShardReadError after the last complete one if the tar breaks.

    A sample is complete once the next member's header names another key, so
    the header is looked at before the member's data is read: a tar that
    breaks inside sample i still yields samples 0..i-1.
    """
    try:
        stream = gopen(url, "rb")
    except OSError as e:
        raise ShardReadError(0, bad.UNREADABLE, e) from None
    index, current = 0, None
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
        except tarfile.TarError as e:
            raise ShardReadError(0, bad.UNREADABLE, e) from None
        for info in tar:
            if not info.isreg() or META_NAME.match(info.name):
                continue
            key, ext = base_plus_ext(info.name)
            if key is not None and (current is None or key != current.key):
                if current is not None:
                    yield current
                    index += 1
                current = TarSample(index, key)
            data = tar.extractfile(info).read()
            tar.members = []  # a streamed tar keeps every header otherwise
            if current is None:  # nothing to attach a note to
                log.warning("%s: member %s before the first sample has no extension; skipped", url, info.name)
                continue
            if key is None or ext.lower() in current.members:
                current.notes.append((bad.UNKNOWN_KEY if key is None else bad.DUPLICATE_KEY, info.name))
                continue
            current.members[ext.lower()] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        # the sample being read when the tar broke is incomplete: it is not yielded
        raise ShardReadError(index, bad.TRUNCATED_TAR, e) from None
    finally:
        stream.close()
    if current is not None:
        yield current


def count_samples(url: str) -> int:
    """Samples in a tar, counted the way the loader numbers them (a broken tar counts what it holds)."""
    n = 0
    try:
        for _ in iter_samples(url):
            n += 1
    except ShardReadError as e:
        log.warning("%s breaks after %d samples (%s)", url, e.index, e)
    return n


# --------------------------------------------------------------------------- writing


def _member_bytes(size: int) -> int:
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


class ShardSink:
    """Writes samples into tars under temporary names, rolling over at a count or byte limit.

    `close()` renames every part into place and returns [{name, count, bytes}];
    `name_of_part(i)` names part i. Members are written with mtime 0 so a
    rerun produces the same bytes (an int: a float mtime costs a pax header per member).
    """

    def __init__(
        self,
        out_dir: str | Path,
        name_of_part: Callable[[int], str],
        max_count: int | None = None,
        max_bytes: int | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.name_of_part = name_of_part
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.parts: list[dict[str, Any]] = []
        self._writer: TarWriter | None = None
        self._tmp: Path | None = None
        self._count = 0
        self._bytes = 0

    def write(self, sample: dict[str, Any]) -> None:
        size = sum(_member_bytes(len(v)) for k, v in sample.items() if not k.startswith("_"))
        full = (self.max_count is not None and self._count >= self.max_count) or (
            self.max_bytes is not None and self._count > 0 and self._bytes + size > self.max_bytes
        )
        if self._writer is None or full:
            self._roll()
        self._writer.write(sample)
        self._count += 1
        self._bytes += size

    def _roll(self) -> None:
        self._close_part()
        name = self.name_of_part(len(self.parts))
        self._tmp = self.out_dir / f".{name}.tmp"
        self._writer = TarWriter(str(self._tmp), encoder=False, mtime=0)
        self.parts.append({"name": name, "count": 0})

    def _close_part(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self.parts[-1].update(count=self._count, bytes=self._tmp.stat().st_size)
        self._writer, self._count, self._bytes = None, 0, 0

    def close(self) -> list[dict[str, Any]]:
        self._close_part()
        for part in self.parts:
            os.replace(self.out_dir / f".{part['name']}.tmp", self.out_dir / part["name"])
        return self.parts

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for part in self.parts:
            (self.out_dir / f".{part['name']}.tmp").unlink(missing_ok=True)


# --------------------------------------------------------------------------- resumable output folders


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class JobDir:
    """An output folder filled by independent jobs; a job counts once its record exists."""

    def __init__(self, out: str | Path, plan: dict[str, Any]):
        self.out = Path(out)
        self.progress = self.out / PROGRESS
        self.plan = json.loads(json.dumps(plan))  # compare as it will read back (tuples become lists)

    def begin(self) -> None:
        """Record the plan (or check it against an earlier run's) and drop temporary files of a crashed run."""
        self.check(missing_ok=True)
        self.progress.mkdir(parents=True, exist_ok=True)
        if not (self.progress / "plan.json").exists():
            write_json_atomic(self.progress / "plan.json", self.plan)
        for stale in self.out.glob(".*.tmp"):
            stale.unlink()

    def check(self, missing_ok: bool = False) -> None:
        """Raise unless the folder was started with this plan (or, with missing_ok, not started at all)."""
        plan_file = self.progress / "plan.json"
        if missing_ok and not plan_file.exists():
            return
        earlier = json.loads(plan_file.read_text())
        if earlier != self.plan:
            changed = sorted(k for k in set(earlier) | set(self.plan) if earlier.get(k) != self.plan.get(k))
            raise ShardError(
                f"{self.out} was started with other inputs or settings (differs in {', '.join(changed)}); "
                f"rerun with the same arguments to resume, or give a new --out."
            )

    def _record_path(self, job: int) -> Path:
        return self.progress / f"job-{job:06d}.json"

    def done(self, job: int) -> bool:
        return self._record_path(job).exists()

    def record(self, job: int, record: dict[str, Any]) -> None:
        write_json_atomic(self._record_path(job), record)

    def records(self, num_jobs: int) -> list[dict[str, Any]]:
        missing = [j for j in range(num_jobs) if not self.done(j)]
        if missing:
            raise ShardError(f"{self.out}: {len(missing)} of {num_jobs} jobs are unfinished; rerun the same command.")
        return [json.loads(self._record_path(j).read_text()) for j in range(num_jobs)]

    def write_manifest(self, manifest: dict[str, Any]) -> Path:
        path = self.out / MANIFEST
        write_json_atomic(path, {"format": FORMAT, "version": VERSION, **manifest})
        return path


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        hint = " (prepare-data has not finished there: rerun it)" if (Path(folder) / PROGRESS).is_dir() else ""
        raise ShardError(f"no {MANIFEST} in {folder}{hint}; point at a folder written by `senseflow prepare-data`.") from None
    except ValueError as e:
        raise ShardError(f"{path} is not valid JSON ({e}); rerun prepare-data to rewrite it.") from None
    if doc.get("format") != FORMAT:
        raise ShardError(f"{path} is not a senseflow shard manifest (format={doc.get('format')!r}).")
    return doc


# --------------------------------------------------------------------------- shard sets


@dataclass(frozen=True)
class ShardSet:
    """The shards a loader reads: their URLs, sample counts and the manifest that describes them."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    manifest: dict[str, Any]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(os.path.basename(u) for u in self.urls)

    @property
    def fingerprint(self) -> str:
        """Identifies the shard list; a saved loader position is only valid for the same one."""
        return fingerprint([list(self.names), list(self.counts)])

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @classmethod
    def open(cls, path: str | None) -> "ShardSet":
        """A folder with manifest.json, or a glob / brace pattern of tars (counted by reading them if no manifest)."""
        if not path:
            raise ShardError("data.path is not set; point it at a folder written by `senseflow prepare-data`.")
        if os.path.isdir(path):
            return cls._from_manifest(path, read_manifest(path), None)
        urls = sorted(u for pattern in braceexpand.braceexpand(path) for u in (glob.glob(pattern) or [pattern]))
        missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
        if missing or not urls:
            raise ShardError(f"data.path={path!r} matches no shard files (first missing: {missing[:1]}); fix the pattern.")
        folder = os.path.dirname(urls[0])
        if os.path.exists(os.path.join(folder, MANIFEST)):
            return cls._from_manifest(folder, read_manifest(folder), {os.path.basename(u) for u in urls})
        log.info("no manifest beside %s: counting the samples of %d shards", path, len(urls))
        counts = [count_samples(u) for u in urls]
        return cls._build(urls, counts, {"kind": "images"})

    @classmethod
    def _from_manifest(cls, folder: str, manifest: dict[str, Any], only: set[str] | None) -> "ShardSet":
        shards = [s for s in manifest.get("shards", []) if only is None or s["name"] in only]
        if only is not None and len(shards) != len(only):
            unknown = sorted(only - {s["name"] for s in shards})
            raise ShardError(f"{unknown[0]} is not listed in {folder}/{MANIFEST}; rerun prepare-data for that folder.")
        return cls._build([os.path.join(folder, s["name"]) for s in shards], [s["count"] for s in shards], manifest)

    @classmethod
    def _build(cls, urls: list[str], counts: list[int], manifest: dict[str, Any]) -> "ShardSet":
        kept = [(u, c) for u, c in zip(urls, counts) if c > 0]  # an empty shard can never be finished by reading it
        if not kept:
            raise ShardError(f"the shards {urls[:1]}... hold no samples; check the prepare-data log and manifest stats.")
        return cls(tuple(u for u, _ in kept), tuple(c for _, c in kept), manifest)
