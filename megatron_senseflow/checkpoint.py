"""Step checkpoints: one directory per step holding every role, optimizer, RNG and the loader position.

    OUT/checkpoints/step_00001200/
        generator/ fake_score/ [ema/]           role checkpoints (models/checkpoint_io.py format)
        generator_optim/ fake_score_optim/      megatron distributed-optimizer states (fully reshardable)
        discriminator.pt                        trainable heads + AdamW state (torch.save, loaded weights_only)
        fixed_samples.pt                        conditioning of the TensorBoard sample grids
        trainer_state.json                      step counters, LR schedules, loader position, NaN counters
    (no RNG state: training noise is a function of (seed, step, sample), see rng.py)
        config.yaml                             the resolved config
        COMPLETE                                written last
    OUT/checkpoints/latest                      text file naming the newest complete step directory

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
from typing import Callable

import torch.distributed as dist

COMPLETE = "COMPLETE"
LATEST = "latest"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 3):
        self.root = Path(root)
        self.keep_last = keep_last

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

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Collective: `write(tmp_dir)` runs on every rank; rank 0 publishes the result atomically."""
        final = self.root / self.step_name(step)
        tmp = self.root / (self.step_name(step) + ".tmp")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        write(tmp)
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
