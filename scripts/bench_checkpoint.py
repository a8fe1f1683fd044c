"""Step time with a checkpoint every step, synchronous against asynchronous saves (checkpoint.async_save).

    python scripts/bench_checkpoint.py [--steps 12] [--nproc 2] [--heads 8]

Runs the tiny recipe (widened to --heads x 64 channels so that a checkpoint is large enough for its write
to matter, the discriminator off) twice through `senseflow train` with checkpoint.every=1 and reads the mean step time
(perf/step_time_s, the trainer's own wall clock per iteration, first two steps dropped) from each run's
metrics; prints both and the ratio sync / async measured in the same invocation.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def step_times(out: Path, steps: int, nproc: int, async_save: bool, teacher: Path) -> list[float]:
    cmd = [sys.executable, "-m", "megatron_senseflow.cli", "train", "tiny", f"roles.teacher.checkpoint={teacher}",
           "roles.discriminator.enabled=false",
           f"train.output_dir={out}", f"train.max_steps={steps}", "checkpoint.every=1", "logging.log_every=1",
           "logging.tensorboard=false", f"checkpoint.async_save={str(async_save).lower()}", "checkpoint.keep_last=2"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r["perf/step_time_s"] for r in rows[2:]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--heads", type=int, default=8, help="attention heads of 64 channels: the width sets the checkpoint size")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.trainer_helpers import make_teacher

    with tempfile.TemporaryDirectory() as tmp:
        arch = {"num_attention_heads": args.heads, "attention_head_dim": 64, "axes_dims_rope": [16, 24, 24]}
        teacher = make_teacher(Path(tmp) / "teacher", arch=arch)
        sync = step_times(Path(tmp) / "sync", args.steps, args.nproc, False, teacher)
        last = sorted((Path(tmp) / "sync" / "checkpoints").glob("step_*"))[-1]
        size_mb = sum(f.stat().st_size for f in last.rglob("*") if f.is_file()) / 1e6
        asyn = step_times(Path(tmp) / "async", args.steps, args.nproc, True, teacher)
    s, a = statistics.mean(sync), statistics.mean(asyn)
    print(f"tiny recipe at {args.heads * 64} channels ({size_mb:.0f} MB per checkpoint), {args.nproc} ranks, "
          f"a checkpoint every step ({len(sync)} steps timed each)")
    print(f"synchronous saves   {s:.3f} s per step")
    print(f"asynchronous saves  {a:.3f} s per step")
    print(f"ratio sync / async  {s / a:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
