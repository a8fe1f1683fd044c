"""Shard writer: LAION-style sources -> filtered, resized webdataset shards + manifest.json.

Two passes. The plan reads metadata only (captions, image headers,
img2dataset's JSON), applies the paper's filters and assigns the surviving
inputs, in source order, to jobs of `max_samples_per_shard`. A job decodes,
resizes and centre-crops its images and writes `shard-JJJJJJ-PP.tar`
(part PP > 00 only when `max_shard_bytes` splits a job). Because the plan
is a pure function of inputs and settings, a rerun computes the same jobs,
finds the finished ones by their records (see `data.shards.JobDir`) and
writes only the rest.

Filters (paper: aesthetic >= 5.0, shorter side >= 1024). An input with no
aesthetic score is kept and counted under `no_aesthetic_score` unless
`missing_aesthetic="drop"`: folder and JSON sources rarely carry scores, and
dropping everything there would be a surprise rather than a filter.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from . import bad
from .imageops import AbsurdImageSize, Buckets, encode_jpeg, load_rgb, open_image, resize_center_crop
from .shards import JobDir, ShardSink, fingerprint
from .bad import Problem
from .sources import SourceItem, open_source

log = logging.getLogger(__name__)

TOO_SMALL = "too_small"
LOW_AESTHETIC = "low_aesthetic"
NO_AESTHETIC = "no_aesthetic"
MISSING_AESTHETIC_POLICIES = ("keep", "drop")


@dataclass(frozen=True, kw_only=True)
class WriteSettings:
    """Everything that decides the content of the shards (a rerun must pass the same)."""

    format: str
    input: str
    resolution: int = 1024
    min_side: int = 1024
    min_aesthetic: float = 5.0
    missing_aesthetic: str = "keep"
    ratios: tuple[float, ...] = (1.0,)
    max_samples_per_shard: int = 1000
    max_shard_bytes: int | None = None
    jpeg_quality: int = 95

    def __post_init__(self):
        if self.missing_aesthetic not in MISSING_AESTHETIC_POLICIES:
            raise ValueError(f"--missing-aesthetic {self.missing_aesthetic!r} must be keep or drop.")
        if self.max_samples_per_shard < 1:
            raise ValueError(f"--max-samples-per-shard {self.max_samples_per_shard} must be at least 1.")
        if self.resolution < 16:
            raise ValueError(f"--resolution {self.resolution} is too small; use at least 16 pixels.")

    @property
    def buckets(self) -> Buckets:
        return Buckets(self.resolution, self.ratios)


def filter_reason(item: SourceItem, s: WriteSettings) -> str | None:
    """Why the paper's filters reject `item` (None: keep). Unknown sizes pass here and are checked on decode."""
    if item.width is not None and min(item.width, item.height) < s.min_side:
        return TOO_SMALL
    if item.aesthetic is None:
        return NO_AESTHETIC if s.missing_aesthetic == "drop" else None
    return LOW_AESTHETIC if item.aesthetic < s.min_aesthetic else None


@dataclass
class Plan:
    jobs: list[list[SourceItem]]
    stats: dict[str, Any]
    problems: list[Problem]


def make_plan(source, s: WriteSettings, workers: int) -> Plan:
    units = source.units()
    filtered: Counter[str] = Counter()
    problems: list[Problem] = []
    accepted: list[SourceItem] = []
    seen: set[str] = set()
    scanned = no_score = 0
    _WORKER["source"] = source
    from ..progress import bar

    for scan in bar(total=len(units), desc="scan", unit="unit", iterable=_map(_scan_unit, units, workers)):
        scanned += len(scan.items) + sum(p.count for p in scan.problems)
        problems.extend(scan.problems)
        for item in scan.items:
            if item.key in seen:
                problems.append(Problem(bad.DUPLICATE_KEY, item.ref, f"key {item.key!r} was seen before"))
                continue
            seen.add(item.key)
            if item.caption is None:
                problems.append(Problem(bad.MISSING_CAPTION, item.ref))
                continue
            reason = filter_reason(item, s)
            if reason is not None:
                filtered[reason] += 1
                continue
            no_score += item.aesthetic is None
            accepted.append(item)
    n = s.max_samples_per_shard
    jobs = [accepted[i : i + n] for i in range(0, len(accepted), n)]
    stats = {"inputs": scanned, "planned": len(accepted), "filtered": dict(filtered), "no_aesthetic_score": no_score}
    return Plan(jobs, stats, problems)


# Worker processes are forked after this is filled, so a source holding a
# million rows is inherited instead of pickled into every task.
_WORKER: dict[str, Any] = {}


def _scan_unit(unit):
    return _WORKER["source"].scan(unit)


def _run_job_in_worker(args: tuple[int, list[SourceItem]]) -> dict[str, Any]:
    return run_job(*args, _WORKER["source"], _WORKER["settings"], _WORKER["out"])


def _map(fn: Callable, items: list, workers: int, ordered: bool = True) -> Iterator:
    """fn over items in `workers` forked processes (inline when 1)."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with mp.get_context("fork").Pool(min(workers, len(items))) as pool:
        yield from (pool.imap if ordered else pool.imap_unordered)(fn, items)


# --------------------------------------------------------------------------- jobs


def make_sample(item: SourceItem, data: bytes, s: WriteSettings) -> dict[str, Any] | str:
    """The shard sample for one input, or the filter reason that rejects it once its real size is known."""
    img = open_image(data)
    w, h = img.size
    if min(w, h) < s.min_side:
        return TOO_SMALL
    target = s.buckets.size_for(w, h)
    out = resize_center_crop(load_rgb(img, need=target), target)
    meta = {
        "key": item.source_key,
        "width": out.width,
        "height": out.height,
        "original_width": w,
        "original_height": h,
        "aesthetic": item.aesthetic,
        "source": item.ref,
    }
    return {
        "__key__": item.key,
        "jpg": encode_jpeg(out, s.jpeg_quality),
        "txt": item.caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def shard_name(job: int, part: int) -> str:
    return f"shard-{job:06d}-{part:02d}.tar"


def run_job(job: int, items: list[SourceItem], source, s: WriteSettings, out: Path) -> dict[str, Any]:
    sink = ShardSink(out, lambda part: shard_name(job, part), s.max_samples_per_shard, s.max_shard_bytes)
    filtered: Counter[str] = Counter()
    problems: list[Problem] = []
    try:
        for item, data in source.read_images(items):
            sample = _sample_or_problem(item, data, s, problems)
            if isinstance(sample, str):
                filtered[sample] += 1
            elif sample is not None:
                sink.write(sample)
        parts = sink.close()
    except BaseException:
        sink.abort()
        raise
    return {"job": job, "shards": parts, "filtered": dict(filtered), "problems": [dataclasses.asdict(p) for p in problems]}


def _sample_or_problem(
    item: SourceItem, data: bytes | Exception, s: WriteSettings, problems: list[Problem]
) -> dict[str, Any] | str | None:
    """make_sample's result, or None after noting why the input could not be used."""
    if isinstance(data, Exception):
        problems.append(Problem(bad.UNREADABLE, item.ref, f"{type(data).__name__}: {data}"))
        return None
    try:
        return make_sample(item, data, s)
    except AbsurdImageSize as e:
        problems.append(Problem(bad.ABSURD_SIZE, item.ref, str(e)))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken images
        problems.append(Problem(bad.UNDECODABLE, item.ref, f"{type(e).__name__}: {e}"))
    return None


# --------------------------------------------------------------------------- the whole run


def write_shards(s: WriteSettings, out: str | Path, workers: int = 1) -> dict[str, Any]:
    """Plan, write the missing jobs, and assemble manifest.json; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = open_source(s.format, s.input)
    plan = make_plan(source, s, workers)
    report = bad.BadDataLog(log)
    for p in plan.problems:
        report.report(p)
    settings = {**dataclasses.asdict(s), "input": os.path.abspath(s.input)}
    identity = [[(i.key, i.ref, i.caption) for i in job] for job in plan.jobs]
    jobdir = JobDir(out, {"settings": settings, "jobs": len(plan.jobs), "fingerprint": fingerprint(identity)})
    jobdir.begin()
    pending = [(j, items) for j, items in enumerate(plan.jobs) if not jobdir.done(j)]
    log.info(
        "%d inputs, %d pass the filters -> %d jobs (%d already written)",
        plan.stats["inputs"], plan.stats["planned"], len(plan.jobs), len(plan.jobs) - len(pending),
    )
    _WORKER.update(source=source, settings=s, out=out)
    from ..progress import bar as progress_bar

    bar = progress_bar(total=sum(len(items) for _, items in pending), desc="write", unit="img")
    for record in _map(_run_job_in_worker, pending, workers, ordered=False):
        jobdir.record(record["job"], record)
        for p in record["problems"]:
            report.report(Problem(**p))
        bar.update(len(plan.jobs[record["job"]]))
    bar.close()
    return _assemble(jobdir, plan, s, settings)


def _assemble(jobdir: JobDir, plan: Plan, s: WriteSettings, settings: dict[str, Any]) -> dict[str, Any]:
    records = jobdir.records(len(plan.jobs))
    shards = [part for r in records for part in r["shards"] if part["count"] > 0]
    skipped: Counter[str] = Counter()
    for p in plan.problems + [Problem(**p) for r in records for p in r["problems"]]:
        skipped[p.reason] += p.count
    filtered = Counter(plan.stats["filtered"])
    for r in records:
        filtered.update(r["filtered"])
    written = sum(p["count"] for p in shards)
    stats = {
        **plan.stats,
        "written": written,
        "filtered": dict(sorted(filtered.items())),
        "skipped": dict(sorted(skipped.items())),
        "missing_aesthetic": s.missing_aesthetic,
    }
    manifest = {
        "kind": "images",
        "resolution": s.resolution,
        "ratios": list(s.ratios),
        "sizes": [list(size) for size in s.buckets.sizes],
        "settings": settings,
        "num_samples": written,
        "shards": shards,
        "stats": stats,
    }
    path = jobdir.write_manifest(manifest)
    log.info("wrote %d samples in %d shards to %s; skipped %s; filtered %s",
             written, len(shards), path.parent, stats["skipped"], stats["filtered"])
    return manifest
