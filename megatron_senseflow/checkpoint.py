"""Step checkpoints: one directory per step, written and read by the parts that own the state.

`CheckpointManager(root, states={name: part})` iterates a registry of stateful
parts; each part writes and reads its own files (`save_state(step_dir)`,
`load_state(step_dir)`, both collective), so save and load cannot drift apart:

    OUT/checkpoints/step_00001200/
        generator/ generator_optim/ generator_scheduler.json      roles.Role (weights are a role checkpoint,
        fake_score/ fake_score_optim/ fake_score_scheduler.json   models/checkpoint_io.py; optimizer states are
                                                                  megatron's, fully reshardable)
        [ema/]                                                    roles.EMA
        [discriminator.pt]                                        discriminator.DiscriminatorRole (heads + AdamW,
                                                                  loaded weights_only)
        data_state.json                                           data_source (loader position of every replica)
        trainer_state.json config.yaml fixed_samples.pt           trainer.Progress (counters, NaN counters, the
                                                                  resolved config, the sample-grid conditioning)
        COMPLETE                                                  written last
    OUT/checkpoints/latest                      text file naming the newest complete step directory
There is no RNG state: training noise is a function of (seed, step, sample), see rng.py.

Atomicity: ranks write into `step_N.tmp/`; after every rank finished, each
rank records the size and a CRC32 of the files it wrote (distcp shards are named
by their writer's rank, the rest are rank 0's), rank 0 writes COMPLETE with
those records, renames the directory to `step_N/` (atomic on POSIX) and only
then replaces `latest` (write + rename). A crash at any point leaves `latest`
naming a complete checkpoint; leftover `.tmp` directories are removed at the
next start.

Integrity: before resuming, the checkpoint's files are checked against
COMPLETE (sizes always, CRC32s unless checkpoint.verify = size, the work shared
by the ranks). A checkpoint that fails is renamed `step_N.corrupt` (never chosen
again, never deleted), one sentence names the file and what is wrong, and the
next older one is tried; with none intact the run refuses (errors.NoIntactCheckpoint).

Failures: before a save the free space of the output filesystem is compared
with what the save needs (the previous checkpoint's size, or an estimate from
the parameter counts for the first); a save that cannot fit or fails to write
ends the run with one sentence (errors.SaveFailed), removes its partial
directory and leaves `latest` as it was.

Asynchronous saves (checkpoint.async_save): the distributed-checkpoint parts
are written by megatron-core's async machinery in a forked process while
training goes on; `maybe_finalize()` at every step boundary publishes the save
once every rank's writer is done. A kill before that leaves the previous
checkpoint as `latest`.
"""
from __future__ import annotations

import json
import re
import shutil
import zlib
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from .errors import NoIntactCheckpoint, SaveFailed

COMPLETE = "COMPLETE"
LATEST = "latest"
DONE_MARKER = "DONE"  # in OUT/, written when a run reached train.max_steps; the Slurm job script
# requeues a run that exits 0 without it (slurm/README.md)
STOP_MARKER = "STOPPED"  # in OUT/, written by rank 0 once the stop-save after a signal is published: the job
# script requeues as soon as it appears instead of waiting for ranks hung in teardown (slurm/job.sh)
FAILED_MARKER = "FAILED"  # in OUT/, written by a rank that ends with an error: the job script ends a step
# that a rank on a lost node keeps alive (srun waits for that node's tasks until Slurm declares it down)
STEP_DIR = re.compile(r"^step_\d{8}$")
SHARD_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")  # torch DCP shards, named by the rank that wrote them
SPACE_MARGIN = 1.1  # free space asked for beyond the expected size of a save


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _all(flag: bool) -> bool:
    """True on every rank iff `flag` holds on every rank (one collective)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _from_rank0(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def crc32(path: Path, chunk: int = 1 << 24) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


class Stateful(Protocol):
    """A checkpoint part: writes and reads its own files in a step directory (collective calls).
    `save_state` returns the async requests of its distributed-checkpoint writes (empty when it wrote
    synchronously: `async_save` is False, or the part writes small files only)."""

    def save_state(self, step_dir: Path, async_save: bool = False) -> list: ...

    def load_state(self, step_dir: Path) -> None: ...


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 3, states: dict[str, Stateful] | None = None,
                 verify: str = "checksum", expected_bytes: Callable[[], float] | None = None,
                 log: Callable[[str], None] = print):
        self.root = Path(root)
        self.keep_last = keep_last
        self.states = dict(states or {})
        self.verify_mode = verify
        self.expected_bytes = expected_bytes
        self.log = log
        self.pending = None  # (step, tmp dir, megatron AsyncCallsQueue) of an async save in flight
        self.last_save_seconds: float | None = None

    @staticmethod
    def step_name(step: int) -> str:
        return f"step_{step:08d}"

    # ------------------------------------------------------------------ finding checkpoints
    def complete(self) -> list[Path]:
        """Complete step directories, oldest first (renamed `.corrupt` and `.tmp` ones never count)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir()
                      if STEP_DIR.match(p.name) and p.is_dir() and (p / COMPLETE).is_file())

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None. A `latest` that names an incomplete one is ignored."""
        marker = self.root / LATEST
        if marker.is_file():
            path = self.root / marker.read_text().strip()
            if STEP_DIR.match(path.name) and (path / COMPLETE).is_file():
                return path
        complete = self.complete()
        return complete[-1] if complete else None

    def clean_partial(self) -> None:
        """Remove `.tmp` directories a crashed save left behind (rank 0)."""
        if _rank() == 0 and self.root.is_dir():
            for p in self.root.glob("step_*.tmp"):
                shutil.rmtree(p, ignore_errors=True)
        _barrier()

    # ------------------------------------------------------------------ integrity
    def _records(self, step_dir: Path) -> dict[str, list]:
        """Collective: {relative path: [size, crc32]} of every file in `step_dir`, each file read by its writer."""
        mine = {}
        rank = _rank()
        for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
            m = SHARD_FILE.match(path.name)
            if (int(m.group(1)) if m else 0) != rank:
                continue
            rel = str(path.relative_to(step_dir))
            mine[rel] = [path.stat().st_size, crc32(path) if self.verify_mode == "checksum" else None]
        gathered = [None] * _world()
        if dist.is_initialized():
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        out: dict[str, list] = {}
        for part in gathered:
            out.update(part)
        return out

    def check(self, step_dir: Path) -> str | None:
        """Collective: None if every file matches its record, else one sentence naming the file and the fault."""
        problem = None
        if _rank() == 0:
            try:
                record = json.loads((step_dir / COMPLETE).read_text())
            except (OSError, ValueError) as e:
                record, problem = {}, f"its {COMPLETE} record cannot be read ({e})"
            for rel, (size, _) in sorted(record.get("files", {}).items()):
                f = step_dir / rel
                if problem is None and not f.is_file():
                    problem = f"{rel} is missing"
                elif problem is None and f.stat().st_size != size:
                    problem = f"{rel} has {f.stat().st_size} bytes, {size} were written"
            files = record.get("files", {})
        else:
            files = None
        problem, files = _from_rank0((problem, files))
        if problem is None and self.verify_mode == "checksum" and files:
            rank, world = _rank(), _world()
            for i, (rel, (_, crc)) in enumerate(sorted(files.items())):
                if i % world == rank and crc is not None and crc32(step_dir / rel) != crc:
                    problem = f"{rel} fails its checksum"
                    break
            found = [None] * world
            if dist.is_initialized():
                dist.all_gather_object(found, problem)
            else:
                found = [problem]
            problem = next((p for p in found if p), None)
        return problem

    def resume_point(self) -> Path | None:
        """Collective: the newest intact complete checkpoint; each corrupt one on the way is renamed, never
        deleted. None when there is none at all; NoIntactCheckpoint when there are some and none is intact."""
        self.clean_partial()
        candidates = self.complete()
        marker = self.latest()
        if marker is not None and marker in candidates:  # `latest` first, then older ones
            candidates = [c for c in candidates if c <= marker]
        tried = []
        for step_dir in reversed(candidates):
            problem = self.check(step_dir)
            if problem is None:
                return step_dir
            bad = step_dir.with_name(step_dir.name + ".corrupt")
            if _rank() == 0:
                step_dir.rename(bad)
                self.log(f"[senseflow] checkpoint {step_dir} is corrupt: {problem}; kept as {bad.name}, "
                         f"trying an older one.")
            _barrier()
            tried.append(f"{step_dir.name} ({problem})")
        if tried:
            raise NoIntactCheckpoint(
                f"no intact checkpoint in {self.root}: {'; '.join(tried)}; each was renamed *.corrupt. Restore one "
                f"from a copy, or start over with checkpoint.resume=false or another train.output_dir.")
        return None

    def load(self, path: Path) -> None:
        """Every registered part reads its state from the step directory `path` (collective)."""
        for part in self.states.values():
            part.load_state(path)

    # ------------------------------------------------------------------ saving
    def _previous_size(self) -> float | None:
        last = self.latest()
        if last is None:
            return None
        try:
            files = json.loads((last / COMPLETE).read_text()).get("files")
        except (OSError, ValueError):
            return None
        return float(sum(size for size, _ in files.values())) if files else None

    def _check_space(self, step: int) -> None:
        problem = None
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            need = self._previous_size() or (self.expected_bytes() if self.expected_bytes else 0.0)
            free = shutil.disk_usage(self.root).free
            if need and free < need * SPACE_MARGIN:
                problem = (f"the checkpoint of step {step} needs about {_size(need)} but the filesystem of {self.root} "
                           f"has {_size(free)} free")
        problem = _from_rank0(problem)
        if problem:
            raise SaveFailed(self._failure(problem))

    def _failure(self, what: str) -> str:
        last = self.latest()
        keep = f"{last.name} is still the latest checkpoint" if last else "no checkpoint was written yet"
        return (f"{what}; {keep}. Free space there or point train.output_dir elsewhere, then rerun the same "
                f"command to resume.")

    def save(self, step: int, async_save: bool = False) -> Path | None:
        """Collective: every part writes into `step_N.tmp/`; rank 0 then publishes it atomically. With
        `async_save` the large parts are written in the background and published by `maybe_finalize`;
        returns the published directory, or None while it is in flight."""
        import time

        self.finalize()  # one save in flight at a time
        self._check_space(step)
        start = time.perf_counter()
        tmp = self.root / (self.step_name(step) + ".tmp")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        requests, error = [], None
        for part in self.states.values():
            try:
                requests += part.save_state(tmp, async_save) or []
            except Exception as e:  # noqa: BLE001 - a full disk shows up as many exception types
                error = error or e
            if not _all(error is None):  # every rank stops at the same part
                self._abandon(tmp, step, error)
        if async_save and requests:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            queue = AsyncCallsQueue()
            queue.schedule_async_request(_one_request(requests))
            self.pending = (step, tmp, queue, start)
            return None
        return self._publish(step, tmp, start)

    def maybe_finalize(self) -> Path | None:
        """Collective, at every step boundary: publish an async save whose writers are all done."""
        return self.finalize(blocking=False)

    def finalize(self, blocking: bool = True) -> Path | None:
        if self.pending is None:
            return None
        step, tmp, queue, start = self.pending
        try:
            queue.maybe_finalize_async_calls(blocking=blocking)
        except Exception as e:  # noqa: BLE001 - raised on every rank by megatron-core when a writer failed
            self.pending = None
            self._abandon(tmp, step, e)
        if queue.get_num_unfinalized_calls():
            return None
        self.pending = None
        return self._publish(step, tmp, start)

    def _abandon(self, tmp: Path, step: int, error: BaseException | None):
        """A failed write: remove the partial directory (rank 0), say why in one sentence, end the run."""
        _barrier()
        message = None
        if _rank() == 0:
            if shutil.disk_usage(self.root).free < (1 << 20):
                cause = "the disk is full"
            else:
                last = str(error).strip().splitlines()[-1] if error is not None and str(error).strip() else ""
                cause = f"{type(error).__name__}: {last}" if error is not None else "a write failed on another rank"
            shutil.rmtree(tmp, ignore_errors=True)
            message = self._failure(f"the checkpoint of step {step} could not be written to {self.root} ({cause}); "
                                    f"its partial directory was removed")
        raise SaveFailed(_from_rank0(message))

    def _publish(self, step: int, tmp: Path, start: float) -> Path:
        import time

        _barrier()
        records = self._records(tmp)
        final = self.root / self.step_name(step)
        if _rank() == 0:
            (tmp / COMPLETE).write_text(json.dumps({"step": step, "checksum": "crc32" if self.verify_mode == "checksum"
                                                    else None, "files": records}, indent=0))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            marker_tmp = self.root / (LATEST + ".tmp")
            marker_tmp.write_text(final.name)
            marker_tmp.replace(self.root / LATEST)
            self._prune(keep=final)
        _barrier()
        self.last_save_seconds = time.perf_counter() - start
        self.log(f"[senseflow] saved {final} in {self.last_save_seconds:.1f} s")
        return final

    def _prune(self, keep: Path) -> None:
        complete = self.complete()
        for old in complete[: max(len(complete) - self.keep_last, 0)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)


def _one_request(requests: list):
    """The parts' async requests as one: one forked writer per save instead of one per distributed
    checkpoint (each fork copies the page tables of a process holding several model copies)."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

    calls = []
    for r in requests:
        args = list(r.async_fn_args)
        if r.preload_fn:  # staging to host memory happens here, before the fork, as megatron-core does it
            args[1] = r.preload_fn()
        calls.append((r.async_fn, args, dict(r.async_fn_kwargs)))

    def write_all():
        for fn, args, kwargs in calls:
            if fn is not None:
                fn(*args, **kwargs)

    return AsyncRequest(write_all, (), [fn for r in requests for fn in r.finalize_fns])


def resolve_role_dir(ckpt: str | Path, role: str = "generator") -> Path:
    """A role checkpoint, a step directory holding one per role, or a train output dir (its latest complete step)."""
    from megatron_senseflow.models.checkpoint_io import META_NAME, CheckpointError

    p = Path(ckpt)
    if not p.is_dir():
        raise CheckpointError(f"--ckpt {p} is not a directory; pass a role checkpoint or a training step directory.")
    latest = CheckpointManager(p / "checkpoints").latest()
    for cand in (p, p / role, *([latest / role] if latest else [])):
        if (cand / META_NAME).is_file():
            return cand
    roles = sorted(d.name for d in p.iterdir() if (d / META_NAME).is_file())
    if roles:
        raise CheckpointError(f"{p} holds roles {', '.join(roles)} but no {role!r}; pass --role {roles[0]}.")
    raise CheckpointError(
        f"{p} is not a senseflow checkpoint (no {META_NAME} in it, in {role}/ or in the latest step under checkpoints/); "
        "pass a directory written by `senseflow convert import` or by training."
    )
