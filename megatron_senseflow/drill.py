"""`senseflow drill RECIPE [overrides] --kills N --out DIR`: a fault drill a user can run before trusting a cluster.

Runs the recipe once without interruption (the reference), then again with
faults, each followed by the same command again, as a requeued job would:
- `kill -9` of every training process at N random moments (during steps and
  during saves; saves happen every 2 steps);
- once, one file of the newest checkpoint truncated (a storage fault after the
  checkpoint was declared complete): the next start must find it, keep it as
  `*.corrupt` and resume from an older one;
- once, the output filesystem filled up (only where it is small, under 1 GB,
  e.g. a tmpfs: the drill will not fill a real disk): the next save must end the
  run with exit code 4 and leave the previous checkpoint as latest; the drill
  then frees the space.
It passes when the faulted run's losses at every step equal the reference's,
and prints one summary line. Exit code 0 when it passes, 1 when it does not.
With `--alternate-saves` the faulted starts alternate between synchronous and
asynchronous saves (`checkpoint.async_save`), so that one drill kills and resumes
both kinds of checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

VOLATILE = ("perf/", "mem/")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="recipe name or YAML path (tiny: a CPU recipe that runs in seconds per step)")
    p.add_argument("overrides", nargs="*", help="dotted overrides (train.max_steps sets the length)")
    p.add_argument("--out", required=True, help="folder for the reference and the faulted run")
    p.add_argument("--kills", type=int, default=3, help="kill -9 at this many random moments (default 3)")
    p.add_argument("--nproc", type=int, default=2, help="training processes per run (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    p.add_argument("--no-corrupt", action="store_true", help="skip the corrupted-file fault")
    p.add_argument("--no-fill-disk", action="store_true", help="skip the full-disk fault")
    p.add_argument("--alternate-saves", action="store_true",
                   help="faulted starts alternate between synchronous and asynchronous saves (the reference saves "
                        "synchronously)")
    p.parse_args = p.parse_intermixed_args  # type: ignore[method-assign]


def _train(config: str, overrides: list[str], out: Path, nproc: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "megatron_senseflow.cli", "train", config, *overrides, f"train.output_dir={out}",
           "checkpoint.every=2", "logging.log_every=1", "logging.tensorboard=false"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _losses(out: Path) -> dict[int, dict]:
    path = out / "metrics.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows}


def _logged_rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    return sum(1 for ln in path.read_text().splitlines() if ln.strip()) if path.exists() else 0


def _saving(out: Path) -> bool:
    return any((out / "checkpoints").glob("step_*.tmp")) if (out / "checkpoints").is_dir() else False


def run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .monitor import keep_rows_up_to

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out).resolve()
    ref_dir, run_dir = out / "reference", out / "faulted"
    for d in (ref_dir, run_dir):
        shutil.rmtree(d, ignore_errors=True)
    rng = random.Random(args.seed)
    say = lambda m: print(f"[drill {time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731

    say(f"reference: {args.config}, {cfg.train.max_steps} steps without faults")
    t0 = time.monotonic()
    ref = _train(args.config, args.overrides, ref_dir, args.nproc)
    startup = None
    while ref.poll() is None:  # when the first step is logged: start-up time, then time per step
        if startup is None and (ref_dir / "metrics.jsonl").exists():
            startup = time.monotonic() - t0
        time.sleep(0.05)
    text = ref.stdout.read()
    if ref.returncode != 0:
        print(text[-3000:])
        print(f"senseflow drill: the reference run failed with exit code {ref.returncode}.", file=sys.stderr)
        return 1
    total = time.monotonic() - t0
    startup = startup or total / 2
    per_step = max(total - startup, 0.1) / cfg.train.max_steps
    reference = _losses(ref_dir)

    events = {"kills": 0, "kills_during_save": 0, "corrupt_found": 0, "full_disk_refused": 0, "restarts": 0,
              "async_starts": 0}
    corrupt_at = None if args.no_corrupt else rng.randint(0, max(args.kills - 1, 0))
    fill_at = None if args.no_fill_disk else rng.randint(0, max(args.kills - 1, 0))
    fill_file = run_dir / "drill_filler.bin"
    pending_fill_check = False
    while True:
        use_async = args.alternate_saves and events["restarts"] % 2 == 1
        saves = ["checkpoint.async_save=true"] if use_async else []
        resume = _resume_step(run_dir)
        rows_at_start = keep_rows_up_to(run_dir / "metrics.jsonl", resume)  # as the run will: rows count this start's steps
        proc = _train(args.config, [*args.overrides, *saves], run_dir, args.nproc)
        started = time.monotonic()
        events["restarts"] += 1
        events["async_starts"] += int(use_async)
        if events["kills"] < args.kills and not pending_fill_check:
            # A random moment of what this start has left to do: late in start-up, in a step, or in a save. It is
            # counted in the steps this start has logged (then a part of a step), not in seconds, so that a machine
            # busier or idler than during the reference moves it but cannot push it past the run's end: the last
            # step is never the one killed.
            steps_first = rng.randint(0, max(cfg.train.max_steps - resume - 2, 0))
            startup_part, step_part = rng.uniform(0.8, 1.0), rng.uniform(0, 0.9)
            # the kill after which a checkpoint is corrupted waits for an older one to fall back to
            corrupting = corrupt_at == events["kills"]
            reached = None  # when this start logged its `steps_first`-th step
            while proc.poll() is None:
                done = _logged_rows(run_dir) - rows_at_start
                if reached is None and steps_first > 0 and done >= steps_first:
                    reached = time.monotonic()
                due = (time.monotonic() - started >= startup * startup_part or done > 0) if steps_first == 0 else \
                    reached is not None and time.monotonic() - reached >= step_part * per_step
                if due and not (corrupting and _complete(run_dir) < 2):
                    break
                time.sleep(0.02)
            if proc.poll() is None:
                during_save = _saving(run_dir)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                events["kills"] += 1
                events["kills_during_save"] += int(during_save)
                say(f"kill -9 #{events['kills']}{' during a save' if during_save else ''}")
                if corrupt_at == events["kills"] - 1:
                    if _corrupt(run_dir, say):
                        events["corrupt_found"] += 1
                    else:  # too early: try again after the next kill
                        corrupt_at += 1
                if fill_at == events["kills"] - 1:
                    pending_fill_check = _fill(run_dir, fill_file, say)
                continue
        text, _ = proc.communicate()
        if pending_fill_check:
            pending_fill_check = False
            if proc.returncode == 4:
                events["full_disk_refused"] += 1
                say("full disk: the run ended with exit code 4 and one sentence; freeing the space")
            else:
                say(f"full disk: expected exit code 4, got {proc.returncode}")
            fill_file.unlink(missing_ok=True)
            continue
        if "corrupt" in text and ".corrupt" in text:
            say("the corrupt checkpoint was found, kept, and an older one resumed")
        if proc.returncode != 0:
            print(text[-3000:])
            print(f"senseflow drill: the faulted run failed with exit code {proc.returncode}.", file=sys.stderr)
            return 1
        if (run_dir / "DONE").is_file():
            break
    got = _losses(run_dir)
    equal = got == reference
    print(f"senseflow drill: {events['kills']} kill -9 ({events['kills_during_save']} during a save), "
          f"{events['corrupt_found']} corrupt checkpoint found and skipped, {events['full_disk_refused']} full disk "
          f"refused, {events['restarts']} starts"
          + (f" ({events['async_starts']} with asynchronous saves)" if args.alternate_saves else "") + "; final losses "
          + (f"equal the uninterrupted run's at all {len(reference)} steps." if equal
             else f"DIFFER from the uninterrupted run's at steps {sorted(s for s in reference if got.get(s) != reference[s])}."))
    return 0 if equal else 1


def _complete(run_dir: Path) -> int:
    from .checkpoint import CheckpointManager

    return len(CheckpointManager(run_dir / "checkpoints").complete())


def _resume_step(run_dir: Path) -> int:
    from .checkpoint import CheckpointManager

    latest = CheckpointManager(run_dir / "checkpoints").latest()
    return int(latest.name.split("_")[1]) if latest else 0


def _corrupt(run_dir: Path, say) -> int:
    """Truncate the largest shard of the newest complete checkpoint (a fault after COMPLETE was written)."""
    from .checkpoint import CheckpointManager

    ckpt = CheckpointManager(run_dir / "checkpoints")
    latest = ckpt.latest()
    if len(ckpt.complete()) < 2:  # the run must have an older one to fall back to
        say("corrupt: fewer than two checkpoints yet; trying after the next kill")
        return 0
    shard = max(latest.rglob("*.distcp"), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    say(f"corrupt: truncated {shard.relative_to(run_dir)} to half")
    return 1


def _fill(run_dir: Path, filler: Path, say) -> bool:
    """Fill the output filesystem, leaving 1 MB, if it is small (under 1 GB): the drill never fills a real disk."""
    free = shutil.disk_usage(run_dir).free
    if free > 1 << 30:
        say(f"full disk: skipped, the output filesystem has {free / 1e9:.1f} GB free (run the drill on a small "
            "filesystem, e.g. a tmpfs, to include this fault)")
        return False
    with open(filler, "wb") as f:
        f.truncate(0)
        remaining = free - (1 << 20)
        block = b"\0" * (1 << 20)
        while remaining > 0:
            f.write(block[: min(len(block), remaining)])
            remaining -= len(block)
    say(f"full disk: filled {run_dir} up to 1 MB free")
    return True
