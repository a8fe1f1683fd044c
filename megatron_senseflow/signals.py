"""SIGTERM / SIGUSR1 mean "save at the next step boundary and exit 0" (Slurm preemption, scancel);
SIGINT (Ctrl-C) means "stop now, without saving" (exit 130).

Installed first thing in `senseflow train`, before torch is imported, so a
signal during start-up is not fatal; the trainer reads the flag at each step
boundary and agrees on it with the other ranks. Data-loader workers ignore
both signals (Slurm signals every process of the step): their parent stops them.
"""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[str] = []
_interrupted: list[bool] = []


def _handler(signum, frame):
    _received.append(signal.Signals(signum).name)


def _interrupt(signum, frame):
    _interrupted.append(True)
    raise KeyboardInterrupt


def install() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)
    signal.signal(signal.SIGINT, _interrupt)


def interrupted() -> bool:
    """Whether Ctrl-C (SIGINT) reached this process: the run stops without saving."""
    return bool(_interrupted)


def ignore_in_worker() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def received() -> str | None:
    return _received[0] if _received else None
