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

Atomicity: ranks write into `step_N.tmp/`; after a barrier rank 0 writes
COMPLETE, renames the directory to `step_N/` (atomic on POSIX) and only then
replaces `latest` (write + rename). A crash at any point leaves `latest`
naming a complete checkpoint; leftover `.tmp` directories are removed at the
next start.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Protocol

import torch.distributed as dist

COMPLETE = "COMPLETE"
LATEST = "latest"
DONE_MARKER = "DONE"  # in OUT/, written when a run reached train.max_steps; the Slurm job script
# requeues a run that exits 0 without it (slurm/README.md)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


class Stateful(Protocol):
    """A checkpoint part: writes and reads its own files in a step directory (collective calls)."""

    def save_state(self, step_dir: Path) -> None: ...

    def load_state(self, step_dir: Path) -> None: ...


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 3, states: dict[str, Stateful] | None = None):
        self.root = Path(root)
        self.keep_last = keep_last
        self.states = dict(states or {})

    @staticmethod
    def step_name(step: int) -> str:
        return f"step_{step:08d}"

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None. A `latest` that names an incomplete one is ignored."""
        marker = self.root / LATEST
        if marker.is_file():
            path = self.root / marker.read_text().strip()
            if (path / COMPLETE).is_file():
                return path
        complete = sorted(p for p in self.root.glob("step_*") if p.is_dir() and (p / COMPLETE).is_file())
        return complete[-1] if complete else None

    def clean_partial(self) -> None:
        """Remove `.tmp` directories a crashed save left behind (rank 0)."""
        if _rank() == 0 and self.root.is_dir():
            for p in self.root.glob("step_*.tmp"):
                shutil.rmtree(p, ignore_errors=True)
        _barrier()

    def load(self, path: Path) -> None:
        """Every registered part reads its state from the step directory `path` (collective)."""
        for part in self.states.values():
            part.load_state(path)

    def save(self, step: int) -> Path:
        """Collective: every part writes into `step_N.tmp/`; rank 0 then publishes it atomically."""
        final = self.root / self.step_name(step)
        tmp = self.root / (self.step_name(step) + ".tmp")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        for part in self.states.values():
            part.save_state(tmp)
        _barrier()
        if _rank() == 0:
            (tmp / COMPLETE).write_text(json.dumps({"step": step}))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            marker_tmp = self.root / (LATEST + ".tmp")
            marker_tmp.write_text(final.name)
            marker_tmp.replace(self.root / LATEST)
            self._prune(keep=final)
        _barrier()
        return final

    def _prune(self, keep: Path) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if p.is_dir() and (p / COMPLETE).is_file())
        for old in complete[: max(len(complete) - self.keep_last, 0)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)


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
