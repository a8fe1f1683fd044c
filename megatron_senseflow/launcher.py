"""`senseflow train --nproc N`: N local training processes, and a clean end for all of them.

Each rank runs `python -m megatron_senseflow.train_cli` with RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT set, in a process group of its own (its
data-loader workers join it), so that one signal reaches a rank and its workers
and nothing else:

- a rank that fails ends the run: the others are blocked in a collective by
  then, so their groups are killed at once (workers included); the launcher
  exits with the failing rank's code (errors.py), and for a bug (code 1) says
  which rank failed and that its traceback is above;
- Ctrl-C (SIGINT to the launcher) is passed to every rank, which stops without
  saving; whatever has not ended after a few seconds is killed; one line names
  the last complete checkpoint; exit code 130;
- SIGTERM / SIGUSR1 are passed on: the ranks save at the next step boundary and
  exit 0 (preemption, as under Slurm).
The ranks' identical one-line errors are printed once.
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time

from . import errors
from .procs import die_with_parent, free_port

GRACE_S = 10.0  # how long ranks get to act on SIGINT before they are killed
POLL_S = 0.05


class _Stderr:
    """Forward the ranks' stderr, every line HOLD_S late: once a rank has failed, what the others printed
    in the meantime (errors of collectives it broke) is dropped; a one-line `senseflow ...:` error several
    ranks print is shown once."""

    HOLD_S = 0.5

    def __init__(self):
        self.seen: set[str] = set()
        self.lock = threading.Lock()
        self.only: int | None = None
        self.queue: collections.deque = collections.deque()
        self.done = threading.Event()
        self.printer = threading.Thread(target=self._print, daemon=True)
        self.printer.start()

    def mute_all_but(self, rank: int) -> None:
        with self.lock:
            self.only = rank

    def pump(self, rank: int, stream) -> None:
        for line in iter(stream.readline, ""):
            self.queue.append((time.monotonic(), rank, line))

    def _print(self) -> None:
        while True:
            finishing = self.done.is_set()
            while self.queue and (finishing or time.monotonic() - self.queue[0][0] >= self.HOLD_S):
                _, rank, line = self.queue.popleft()
                with self.lock:
                    if self.only is not None and rank != self.only:
                        continue
                    if line.startswith("senseflow "):
                        if line in self.seen:
                            continue
                        self.seen.add(line)
                sys.stderr.write(line)
                sys.stderr.flush()
            if finishing:
                return
            time.sleep(0.05)

    def close(self) -> None:
        self.done.set()
        self.printer.join(timeout=5)


def launch(nproc: int, argv: list[str], last_checkpoint=lambda: None, module: str = "megatron_senseflow.train_cli",
           prog: str = "senseflow train") -> int:
    """Run `python -m module argv` in `nproc` ranks; `last_checkpoint()` names the newest complete checkpoint."""
    port = str(free_port())
    procs: list[subprocess.Popen] = []
    errs = _Stderr()
    pumps = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "SENSEFLOW_LAUNCHER": "1"}
        p = subprocess.Popen([sys.executable, "-m", module, *argv], env=env,
                             stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=die_with_parent)
        procs.append(p)
        t = threading.Thread(target=errs.pump, args=(rank, p.stderr), daemon=True)
        t.start()
        pumps.append(t)

    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        for p in procs:
            _signal_group(p, signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    cause: tuple[int, int] | None = None  # (rank, exit code) of the first rank that failed
    interrupted_at = None
    try:
        while any([p.poll() is None for p in procs]):  # a list: every rank is polled (and reaped) each time
            if signal.SIGINT in received and interrupted_at is None:
                interrupted_at = time.monotonic()
            if interrupted_at is not None and time.monotonic() - interrupted_at > GRACE_S:
                _kill_all(procs)
            if cause is None and signal.SIGINT not in received:
                failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode not in (None, 0)]
                if failed:
                    # a rank killed by a signal caused the others' errors (a broken collective), never the reverse
                    cause = min(failed, key=lambda f: f[1] >= 0)
                    errs.mute_all_but(cause[0])
                    _kill_all(procs)  # the others wait in a collective for the rank that is gone
            time.sleep(POLL_S)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _kill_all(procs)  # anything a rank left behind in its group (a data-loader worker)
        for t in pumps:
            t.join(timeout=2)
        errs.close()
    if signal.SIGINT in received:
        last = last_checkpoint()
        where = f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet"
        print(f"{prog}: interrupted; {where} (rerun the same command to resume from it).",
              file=sys.stderr, flush=True)
        return errors.INTERRUPTED
    if cause is None:
        codes = [p.returncode for p in procs]
        return next((c for c in codes if c != 0), 0)
    rank, code = cause
    if code < 0 or code == errors.ERROR:
        how = f"was killed by signal {-code}" if code < 0 else "failed (its traceback is above)"
        print(f"{prog}: rank {rank} {how}; the other ranks were stopped.", file=sys.stderr, flush=True)
        return errors.ERROR
    return code


def _signal_group(p: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(p.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_all(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every rank's process group: the rank and its data-loader workers."""
    for p in procs:
        _signal_group(p, signal.SIGKILL)
