"""Streaming, resumable, data-parallel loader over webdataset shards.

    loader = ShardLoader(cfg.data, dp_rank, dp_size)   # infinite iterator of batches
    batch = next(loader)
    states = all_gather(loader.state_dict())             # the trainer gathers every DP rank's state
    saved = ShardLoader.merge_states(states)             # one global position, JSON
    loader = ShardLoader(cfg.data, r, new_dp_size); loader.load_state_dict(saved)

Batches (B = micro_batch_size):
    encoded shards: latent [B,C,h,w] float32 (already (z - shift) * scale), text [B,L,D], pooled [B,P],
                    image [B,3,H,W] in [-1, 1] when cfg.real_images, prompt, key, epoch (lists)
    image shards:   image, prompt, key, epoch

Who reads what. Samples are named (shard, index): shards by their place in
the manifest, samples by their place in the tar. Epoch e permutes all shards
with (seed, e); DP rank r takes every dp_size-th shard of that order from r
on, and its worker w every num_workers-th of those. The split depends on the
DP rank only, so all TP/PP/CP ranks of one replica read the same samples.
Each worker streams its shards through a shuffle buffer, moves to the next
epoch by itself, and hands its items over in chunks cut at every CHUNK-th
pick; DataLoader serves the workers' chunks strictly in turn.

Position. A sample is consumed when it leaves in a batch (a skipped bad
sample when it is dropped). The position is, per epoch, the set of consumed
samples: shards finished whole ("done") and index sets of shards begun. A
rank's state also says in which epoch each of its workers is: a worker that
has moved past epoch e has delivered, and the rank has consumed, all of its
shards of e, so `merge_states` adds those shards without them being stored.
Epochs every worker of every rank has left drop out. The state is small
(bitmaps in base64) and does not grow with the length of the run.

Resume. A loaded position is a base: each epoch still assigns all shards by
the rule above (done shards read as empty), readers skip consumed samples,
and the shuffle is a pure function of what is left. The buffer keeps items
in stream order and its k-th pick is hash(seed, epoch, rank, worker, k) mod
its length; after k picks it holds the first `shuffle_buffer` unconsumed
items of the worker's stream, and k is the number of consumed samples in
the worker's shards, so both are rebuilt from the position alone, and so
are the chunk cuts. Whose turn is next is the one thing the sets do not
tell; the merged state keeps it per rank for a loader of the same layout.
Hence:
  * same DP size and workers: every rank continues with exactly the batches
    an uninterrupted run would have produced;
  * another DP size or number of workers: the unconsumed samples of each open
    epoch are split again; every one of them is delivered exactly once
    before its epoch ends (no repeats, no skips), in a different order.
With aspect buckets and micro_batch_size > 1, samples wait for a batch of
their shape; they are not consumed until it leaves, so the guarantee holds,
but the order after a resume may differ from the uninterrupted run's.

Bad data (truncated tars, undecodable or absurdly sized images, missing
captions or fields, wrong shapes, NaN/inf arrays, unknown members) is
skipped, counted in `stats()` and the state, and logged (see `data.bad`).
Members are decoded by extension from a fixed table (`data.decode`): images
by PIL, captions as UTF-8, `.npy` with allow_pickle=False. Nothing else is
ever decoded, so a `.pyd`/`.pth`/`.pickle` member is counted as unknown and
left alone.
"""
from __future__ import annotations

import base64
import copy
import itertools
import json
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatron_senseflow.config import ConfigError, DataConfig
from megatron_senseflow.rng import mix

from . import bad
from .decode import SampleSpec, Skip, sample_spec
from .shards import ShardReadError, ShardSet, iter_samples

log = logging.getLogger(__name__)

STATE_VERSION = 1
CHUNK = 8  # items per message from a worker: one DataLoader round trip per item cost more than decoding


class DataStateError(ConfigError):
    """A loader state that does not fit the data or the call, said in one sentence with the fix."""


# --------------------------------------------------------------------------- who reads what


def epoch_order(seed: int, epoch: int, num_shards: int) -> list[int]:
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def assigned_shards(seed: int, epoch: int, num_shards: int, dp_size: int, dp_rank: int, num_workers: int, worker: int) -> list[int]:
    return epoch_order(seed, epoch, num_shards)[dp_rank::dp_size][worker::num_workers]


def shuffled(items: Iterator, capacity: int, key: int, start: int) -> Iterator:
    """Buffer shuffle whose state after k picks depends only on which items were picked (see module doc).

    Items with a negative index are notes, not samples: they pass straight through and take no pick.
    """
    buf: list = []
    k = start
    for item in items:
        if item.index < 0:
            yield item
            continue
        buf.append(item)
        if len(buf) >= capacity:
            yield buf.pop(mix(key, k) % len(buf))
            k += 1
    while buf:
        yield buf.pop(mix(key, k) % len(buf))
        k += 1


# --------------------------------------------------------------------------- position


def _bits(indices: set[int]) -> str:
    if not indices:
        return ""
    arr = np.zeros(max(indices) + 1, dtype=bool)
    arr[list(indices)] = True
    return base64.b64encode(np.packbits(arr, bitorder="little").tobytes()).decode("ascii")


def _unbits(text: str) -> set[int]:
    if not text:
        return set()
    arr = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8), bitorder="little")
    return set(np.flatnonzero(arr).tolist())


@dataclass
class EpochProgress:
    """Consumed samples of one epoch: whole shards, and index sets of shards begun."""

    done: set[int] = field(default_factory=set)
    partial: dict[int, set[int]] = field(default_factory=dict)

    def consumed(self, shard: int, count: int) -> int:
        return count if shard in self.done else len(self.partial.get(shard, ()))

    def skip(self, shard: int) -> set[int]:
        return self.partial.get(shard, set())

    def add(self, shard: int, index: int, count: int) -> None:
        seen = self.partial.setdefault(shard, set())
        seen.add(index)
        if len(seen) >= count:
            self.done.add(shard)
            del self.partial[shard]

    def update(self, other: "EpochProgress") -> None:
        for shard, seen in other.partial.items():
            self.partial.setdefault(shard, set()).update(seen)
        self.mark_done(other.done)

    def mark_done(self, shards) -> None:
        self.done.update(shards)
        for shard in self.done & set(self.partial):
            del self.partial[shard]

    def to_json(self) -> dict[str, Any]:
        return {"done": _bits(self.done), "partial": {str(s): _bits(i) for s, i in sorted(self.partial.items())}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EpochProgress":
        return cls(_unbits(d["done"]), {int(s): _unbits(b) for s, b in d["partial"].items()})


def _epochs_to_json(epochs: dict[int, EpochProgress]) -> dict[str, Any]:
    return {str(e): p.to_json() for e, p in sorted(epochs.items())}


def _epochs_from_json(d: dict[str, Any]) -> dict[int, EpochProgress]:
    return {int(e): EpochProgress.from_json(p) for e, p in d.items()}


# --------------------------------------------------------------------------- the per-worker stream


@dataclass
class _Item:
    """One sample on its way from a tar to a batch; a bad one carries the reason instead of members."""

    shard: int
    index: int
    key: str
    sample: Any = None
    reason: str = ""
    detail: str = ""


@dataclass(frozen=True)
class _StreamSpec:
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    seed: int
    dp_size: int
    dp_rank: int
    num_workers: int
    shuffle_buffer: int
    start_epoch: int
    base: dict[int, EpochProgress]
    samples: SampleSpec
    first_worker: int
    """The worker whose chunk comes first: DataLoader always starts its round-robin at its worker 0."""


class _Stream(IterableDataset):
    """One worker's items: its shards of each epoch, read, shuffled and decoded, forever."""

    def __init__(self, spec: _StreamSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.spec.first_worker) % self.spec.num_workers
        for epoch in itertools.count(self.spec.start_epoch):
            yield from self._epoch(epoch, worker)

    def _epoch(self, epoch: int, worker: int) -> Iterator[list[dict[str, Any]]]:
        s = self.spec
        base = s.base.get(epoch, EpochProgress())
        shards = assigned_shards(s.seed, epoch, len(s.urls), s.dp_size, s.dp_rank, s.num_workers, worker)
        start = sum(base.consumed(i, s.counts[i]) for i in shards)
        raw = (item for i in shards if i not in base.done for item in self._read(i, base.skip(i)))
        key = mix(s.seed, epoch, s.dp_rank, worker)
        items = (self._decode(item, epoch, worker) for item in shuffled(raw, max(1, s.shuffle_buffer), key, start))
        yield from _chunks(items, start)

    def _read(self, shard: int, skip: set[int]) -> Iterator[_Item]:
        """Every index of the shard once: a sample, or a bad item when the tar is broken there."""
        url, count = self.spec.urls[shard], self.spec.counts[shard]
        n = 0
        reason, detail = bad.TRUNCATED_TAR, ""
        try:
            for sample in iter_samples(url):
                n = sample.index + 1
                if sample.index >= count:
                    yield _Item(shard, -1, sample.key, reason=bad.EXTRA_SAMPLE, detail=f"the manifest lists {count}")
                elif sample.index not in skip:
                    yield _Item(shard, sample.index, sample.key, sample)
            detail = f"holds {n} of the {count} samples the manifest lists"
        except ShardReadError as e:
            n, reason, detail = e.index, e.reason, str(e)
        for index in range(n, count):
            if index not in skip:
                yield _Item(shard, index, f"#{index}", reason=reason, detail=detail)

    def _decode(self, item: _Item, epoch: int, worker: int) -> dict[str, Any]:
        out: dict[str, Any] = {"epoch": epoch, "worker": worker, "shard": item.shard, "index": item.index,
                               "key": item.key, "reason": item.reason, "detail": item.detail, "notes": []}
        if item.sample is None:
            return out
        known = self.spec.samples.known
        out["notes"] = item.sample.notes + [(bad.UNKNOWN_KEY, ext) for ext in item.sample.members if ext not in known]
        try:
            out.update(self.spec.samples.decode(item.sample))
        except Skip as e:
            out.update(reason=e.reason, detail=e.detail)
        return out


def _chunks(items: Iterator[dict[str, Any]], picks: int) -> Iterator[list[dict[str, Any]]]:
    """Lists of items cut where the pick count reaches a multiple of CHUNK, so that a worker
    resumed at any pick cuts where the uninterrupted one did."""
    chunk: list[dict[str, Any]] = []
    for item in items:
        chunk.append(item)
        if item["index"] >= 0:
            picks += 1
            if picks % CHUNK == 0:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _as_is(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # numpy arrays cross to the main process pickled: for one sample that is 2-3x faster than
    # the shared-memory tensors DataLoader's default conversion would make of them
    return chunk


def _worker_init(_: int) -> None:
    from megatron_senseflow import signals

    torch.set_num_threads(1)  # PIL and numpy do the work; torch threads would only oversubscribe the cores
    signals.ignore_in_worker()  # Slurm signals every process; the trainer decides, workers just stop with it


# --------------------------------------------------------------------------- the loader


class ShardLoader:
    """Infinite iterator of batches for one data-parallel rank; see the module docstring."""

    def __init__(self, cfg: DataConfig, dp_rank: int, dp_size: int):
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank={dp_rank} must lie in 0..{dp_size - 1} for dp_size={dp_size}.")
        if cfg.micro_batch_size < 1:
            raise ConfigError(f"data.micro_batch_size={cfg.micro_batch_size} must be at least 1.")
        if cfg.seed < 0:
            raise ConfigError(f"data.seed={cfg.seed} must not be negative; numpy seeds the shard order with it.")
        self.cfg = cfg
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.shards = ShardSet.open(cfg.path)
        self.samples = sample_spec(cfg, self.shards)
        num_shards = len(self.shards.urls)
        if num_shards < dp_size:  # checked on every rank alike, so no rank waits for one that failed
            raise ConfigError(
                f"{cfg.path} has {num_shards} shards, fewer than the {dp_size} data-parallel ranks; "
                f"write more, smaller shards (prepare-data --max-samples-per-shard)."
            )
        # Workers beyond the rank's shard count would never get a shard to read.
        self.num_workers = max(1, min(cfg.num_workers, len(range(dp_rank, num_shards, dp_size))))
        self._reset(epochs={}, start_epoch=0, base_stats={}, first_worker=0)

    # ------------------------------------------------------------------ iteration

    def _reset(self, epochs: dict[int, EpochProgress], start_epoch: int, base_stats: dict[str, int], first_worker: int) -> None:
        self.close()
        self._epochs = epochs
        self._last_epoch = [start_epoch] * self.num_workers
        self._served = (first_worker - 1) % self.num_workers  # worker of the last chunk taken
        self._base_stats = dict(base_stats)
        self._bad = bad.BadDataLog(log)
        self._num_samples = 0
        self._bad_in_a_row = 0

    def _start(self) -> Iterator[list[dict[str, Any]]]:
        spec = _StreamSpec(
            urls=self.shards.urls,
            counts=self.shards.counts,
            seed=self.cfg.seed,
            dp_size=self.dp_size,
            dp_rank=self.dp_rank,
            num_workers=self.num_workers,
            shuffle_buffer=self.cfg.shuffle_buffer,
            start_epoch=min(self._last_epoch),
            base=copy.deepcopy(self._epochs),
            samples=self.samples,
            first_worker=self._next_worker(),
        )
        if self.cfg.num_workers == 0:
            return iter(_Stream(spec))
        return iter(DataLoader(
            _Stream(spec), batch_size=None, collate_fn=_as_is, num_workers=self.num_workers, worker_init_fn=_worker_init
        ))

    def _next_item(self) -> dict[str, Any]:
        if not self._chunk:
            self._chunk.extend(next(self._items))
            self._served = self._chunk[0]["worker"]
        return self._chunk.popleft()

    def _next_worker(self) -> int:
        """The worker whose items come next: the one whose chunk is half taken, else the following one."""
        return self._chunk[0]["worker"] if self._chunk else (self._served + 1) % self.num_workers

    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._items is None:
            self._items = self._start()
        while True:
            item = self._next_item()
            self._last_epoch[item["worker"]] = item["epoch"]
            where = f"{self.shards.names[item['shard']]}:{item['key']}"
            for reason, member in item["notes"]:
                self._bad.record(reason, f"{where} member {member}", "not decoded")
            if item["reason"]:
                self._skip(item, where)
                continue
            self._bad_in_a_row = 0
            group = self._pending.setdefault(_shape_key(item), [])
            group.append(item)
            if len(group) == self.cfg.micro_batch_size:
                del self._pending[_shape_key(item)]
                return self._emit(group)

    def _skip(self, item: dict[str, Any], where: str) -> None:
        self._bad.record(item["reason"], where, item["detail"])
        if item["index"] >= 0:
            self._consume(item)
        self._bad_in_a_row += 1
        if self._bad_in_a_row > self.shards.num_samples:
            raise ConfigError(
                f"no usable sample in {self._bad_in_a_row} consecutive samples of {self.cfg.path} "
                f"(skipped: {self._bad.as_dict()}); the shards are broken, check the log and rewrite them."
            )

    def _consume(self, item: dict[str, Any]) -> None:
        epoch = item["epoch"]
        if epoch not in self._epochs:
            self._prune()
            self._epochs[epoch] = EpochProgress()
        self._epochs[epoch].add(item["shard"], item["index"], self.shards.counts[item["shard"]])

    def _emit(self, group: list[dict[str, Any]]) -> dict[str, Any]:
        for item in group:
            self._consume(item)
        self._num_samples += len(group)
        batch: dict[str, Any] = {name: [it[name] for it in group] for name in ("key", "prompt", "epoch")}
        for name in ("latent", "text", "pooled"):
            if name in group[0]:
                batch[name] = torch.from_numpy(_stack_float32([it[name] for it in group]))
        if "image" in group[0]:
            batch["image"] = torch.from_numpy(_stack_unit_range([it["image"] for it in group]))
        return batch

    def shutdown(self) -> None:
        """End of a run: kill the worker processes at once. A worker can sit blocked on a full pipe that
        nobody reads any more, and it ignores SIGTERM (signals.ignore_in_worker), so a polite shutdown
        could wait for ever; nothing of a worker's is worth waiting for at this point."""
        items = getattr(self, "_items", None)
        if items is not None and getattr(items, "_worker_pids_set", False):
            # unregister the workers from torch's SIGCHLD check first, or their death raises
            # "DataLoader worker is killed by signal" in whatever this process is doing next
            from torch.utils.data._utils import signal_handling

            signal_handling._remove_worker_pids(id(items))
            items._worker_pids_set = False
        for w in getattr(items, "_workers", None) or []:
            if w.is_alive():
                w.kill()
                w.join(timeout=5)
        self.close()

    def close(self) -> None:
        """Stop the worker processes; iteration restarts from the current position."""
        if getattr(self, "_items", None) is not None:
            # samples taken but not consumed (a chunk's rest, samples held for a batch of their
            # shape) are delivered again by the restarted workers
            self._last_epoch = self._worker_epochs()
            self._served = (self._next_worker() - 1) % self.num_workers
        self._pending: dict[tuple, list[dict[str, Any]]] = {}
        self._chunk: deque[dict[str, Any]] = deque()
        self._items = None

    # ------------------------------------------------------------------ position

    def _worker_epochs(self) -> list[int]:
        """Per worker, the oldest epoch with samples not yet consumed (held samples count)."""
        epochs = list(self._last_epoch)
        for group in self._pending.values():
            for item in group:
                epochs[item["worker"]] = min(epochs[item["worker"]], item["epoch"])
        return epochs

    def _prune(self) -> None:
        oldest = min(self._worker_epochs())
        for epoch in [e for e in self._epochs if e < oldest]:
            del self._epochs[epoch]

    def stats(self) -> dict[str, Any]:
        """This rank's counters since it was built or loaded: samples delivered, and skipped items by reason."""
        return {"samples": self._num_samples, "skipped": self._bad.as_dict()}

    def state_dict(self) -> dict[str, Any]:
        """This rank's position (JSON-serialisable); merge all DP ranks' with merge_states before saving."""
        self._prune()
        return {
            "kind": "rank",
            "version": STATE_VERSION,
            "fingerprint": self.shards.fingerprint,
            "num_shards": len(self.shards.urls),
            "seed": self.cfg.seed,
            "dp_size": self.dp_size,
            "dp_rank": self.dp_rank,
            "num_workers": self.num_workers,
            "next_worker": self._next_worker(),
            "worker_epochs": self._worker_epochs(),
            "epochs": _epochs_to_json(self._epochs),
            "stats": self._bad.as_dict(),
            "base_stats": self._base_stats,
        }

    @staticmethod
    def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        """All DP ranks' state_dicts -> one global position that any DP size can load."""
        _check_rank_states(states)
        first = states[0]
        num_shards, seed, dp_size = first["num_shards"], first["seed"], first["dp_size"]
        epochs = {s["dp_rank"]: _epochs_from_json(s["epochs"]) for s in states}
        every = [e for s in states for e in s["worker_epochs"]] + [e for ep in epochs.values() for e in ep]
        merged: dict[int, EpochProgress] = {}
        for epoch in range(min(every), max(every) + 1):
            p = EpochProgress()
            for s in states:
                p.update(epochs[s["dp_rank"]].get(epoch, EpochProgress()))
                for worker, at in enumerate(s["worker_epochs"]):
                    if at > epoch:  # this worker delivered all of its shards of `epoch`
                        p.mark_done(
                            assigned_shards(seed, epoch, num_shards, dp_size, s["dp_rank"], s["num_workers"], worker)
                        )
            merged[epoch] = p
        first_open = next((e for e in sorted(merged) if len(merged[e].done) < num_shards), max(every) + 1)
        return {
            "kind": "global",
            "version": STATE_VERSION,
            "fingerprint": first["fingerprint"],
            "num_shards": num_shards,
            "epoch": first_open,
            "epochs": _epochs_to_json({e: p for e, p in merged.items() if e >= first_open and (p.done or p.partial)}),
            "stats": bad.add_counts(first["base_stats"], *(s["stats"] for s in states)),
            # whose turn it was on each rank: lets a loader with the same layout continue exactly
            "turns": {"dp_size": dp_size, "ranks": [[s["num_workers"], s["next_worker"]] for s in sorted(states, key=_rank)]},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a global position (merge_states); a single rank's state is accepted when dp_size was 1."""
        if state.get("kind") == "rank" and state.get("dp_size") == 1:
            state = self.merge_states([state])
        if state.get("kind") != "global" or state.get("version") != STATE_VERSION:
            raise DataStateError(
                f"load_state_dict needs the output of ShardLoader.merge_states (got kind={state.get('kind')!r}, "
                f"version={state.get('version')!r}); merge every DP rank's state_dict first."
            )
        if state["fingerprint"] != self.shards.fingerprint:
            raise DataStateError(
                f"the saved data position belongs to another shard list (fingerprint {state['fingerprint']}, "
                f"now {self.shards.fingerprint} for {self.cfg.path}); point data.path at the same shards, "
                f"or start the data position afresh by not loading it."
            )
        turns = state.get("turns", {})
        num_workers, first = turns["ranks"][self.dp_rank] if turns.get("dp_size") == self.dp_size else (None, 0)
        self._reset(_epochs_from_json(state["epochs"]), state["epoch"], state["stats"],
                    first if num_workers == self.num_workers else 0)


# Collation is numpy, one pass per sample into the batch: torch's intra-op threads made it
# 50x slower on a 2-core machine, and stack-then-convert passes over a batch that no longer
# fits in cache.


def _stack_float32(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty((len(arrays), *arrays[0].shape), np.float32)
    for o, a in zip(out, arrays):
        np.copyto(o, a)
    return out


def _stack_unit_range(images: list[np.ndarray]) -> np.ndarray:
    """uint8 images (4x less to send from the workers than float) -> float32 in [-1, 1]."""
    out = np.empty((len(images), *images[0].shape), np.float32)
    for o, a in zip(out, images):
        np.multiply(a, np.float32(2 / 255), out=o, dtype=np.float32)
        o -= 1.0
    return out


def _rank(state: dict[str, Any]) -> int:
    return state["dp_rank"]


def _shape_key(item: dict[str, Any]) -> tuple:
    return tuple(tuple(item[n].shape) for n in ("image", "latent") if n in item)


def _check_rank_states(states: list[dict[str, Any]]) -> None:
    if not states or any(s.get("kind") != "rank" or s.get("version") != STATE_VERSION for s in states):
        raise DataStateError("merge_states takes the list of every DP rank's ShardLoader.state_dict().")
    first = states[0]
    for name in ("fingerprint", "num_shards", "seed", "dp_size"):
        values = {json.dumps(s[name]) for s in states}
        if len(values) > 1:
            raise DataStateError(f"the ranks' states disagree on {name} ({sorted(values)}); gather them from one run.")
    ranks = sorted(s["dp_rank"] for s in states)
    if ranks != list(range(first["dp_size"])):
        raise DataStateError(
            f"merge_states needs exactly one state per DP rank 0..{first['dp_size'] - 1}, got ranks {ranks}."
        )
    if len({json.dumps(s["base_stats"], sort_keys=True) for s in states}) > 1:
        raise DataStateError("the ranks' states were resumed from different positions; gather them from one run.")

