"""Progress bars for the steps that can take minutes (convert, export, prepare-data, encode, sample, eval, building
and loading large roles).

A bar is drawn on a terminal only (tqdm's own test of stderr), by the first rank only, and never after
`--no-progress` (every `senseflow` verb takes it). The switch travels to the processes a verb starts (torchrun
workers, encode workers) through the environment, so one flag silences a whole job.
"""
from __future__ import annotations

import os
import sys

ENV = "SENSEFLOW_PROGRESS"


def set_enabled(flag: bool | None) -> None:
    """--no-progress (False) for this process and every process it starts; None leaves the terminal test."""
    if flag is False:
        os.environ[ENV] = "0"


def _first_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def bar(total: int | None = None, desc: str = "", unit: str = "it", *, main: bool | None = None,
        enabled: bool | None = None, **kwargs):
    """A tqdm bar on stderr. `main`: this process is the one that reports (default: RANK 0); `enabled`: a verb's
    own --progress / --no-progress (None: on a terminal only)."""
    from tqdm import tqdm

    main = _first_rank() if main is None else main
    if enabled is False or os.environ.get(ENV) == "0" or not main:
        disable = True
    else:
        disable = False if enabled else None  # None: tqdm draws only when stderr is a terminal
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True, **kwargs)


def write(line: str) -> None:
    """A log line that does not tear a bar on the terminal (tqdm.write), flushed for whoever tails the log."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()
