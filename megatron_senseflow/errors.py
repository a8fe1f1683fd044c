"""How a run ends: errors meant for a person, the reasons a run stops, and the exit code of each.

Every error a person can fix (config, architecture and layout, checkpoint,
conversion, verification, data) derives from `UserError`. A run that cannot
go on for another reason raises a `RunEnded` subclass. The entry points
(`senseflow VERB`, the torchrun entry `megatron_senseflow.train_cli`) catch
them once: one line on stderr, the exit code below, no traceback. Anything
else is a bug and keeps its traceback (exit 1).

| code | meaning | Slurm job script |
|---|---|---|
| 0 | finished (DONE written), or stopped by SIGTERM / SIGUSR1 after saving | finished / requeue |
| 1 | an unexpected error (a bug, a lost node): its traceback is in the log | requeue if a newer checkpoint was published since the (re)start; else at most `--retries-without-progress` times in a row |
| 2 | a refused input (config, paths, checkpoints of another model, data) | no requeue |
| 3 | repeated non-finite losses | no requeue |
| 4 | a checkpoint could not be written (disk full, write error); the previous one is still `latest` | no requeue |
| 5 | no intact checkpoint to resume from (each corrupt one was renamed `*.corrupt`) | no requeue |
| 130 | interrupted (Ctrl-C) | no requeue |

The job script's own codes (64 malformed script, 65 max restarts, 66 requeue
failed, 67 too many failures without progress) are in slurm/README.md.
"""
from __future__ import annotations

OK = 0
ERROR = 1
USER_ERROR = 2
NAN_ABORT = 3
SAVE_FAILED = 4
NO_INTACT_CHECKPOINT = 5
INTERRUPTED = 130


class UserError(ValueError):
    """A refused input, in one sentence: what is wrong with which value, and what to do."""


class ConfigError(UserError):
    """A configuration that cannot run, said in one sentence that names the value and the fix."""


class RunEnded(RuntimeError):
    """The run stops for a reason the message says in one sentence; `exit_code` tells the launcher which."""

    exit_code = ERROR


class TrainingAborted(RunEnded):
    """Repeated non-finite losses: the last checkpoint is intact; the message says what to try."""

    exit_code = NAN_ABORT


class SaveFailed(RunEnded):
    """A checkpoint could not be written; its partial directory is gone and `latest` is unchanged."""

    exit_code = SAVE_FAILED


class NoIntactCheckpoint(RunEnded):
    """Every checkpoint to resume from failed its integrity check (each was renamed, none deleted)."""

    exit_code = NO_INTACT_CHECKPOINT
