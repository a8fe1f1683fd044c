"""Process helpers on the ground floor: a free port, children that die with their parent, no stderr for a helper
while it starts.

They import nothing of ours, so that the launcher, the distributed bootstrap and the checkpoint writer's helper
server can all use them without importing one another (a spawned helper server imports only this module).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent(parent: int | None = None) -> None:
    """In a child process (a rank, before exec; a helper process of a rank): SIGKILL it when its parent dies
    (a killed launcher must not leave ranks running; Linux prctl PR_SET_PDEATHSIG, a no-op elsewhere).
    `parent`: the pid the child was started by; a parent that died before the prctl took effect (the signal
    would then never come) ends the child here."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if parent is not None and os.getppid() != parent:
        os._exit(0)


_FORKING: int | None = None  # the pid of the process that is forking right now (set by the before-fork hook)
_CHILDREN_DIE = False


def children_die_with_me() -> None:
    """Every process this one forks from now on, and theirs in turn, gets SIGKILL when its parent dies.

    A rank dies with its launcher (die_with_parent), but the processes a rank forks do not inherit that:
    megatron-core's checkpoint writer workers, data-loader workers. A `kill -9` of the launcher during a save (the
    drill's, a user's) left writer workers blocked forever on a lock their dead rank held, holding the run's
    files and sockets. The signal follows the forking thread (Linux), so this suits processes that fork from
    their main thread, as ours and megatron-core's do."""
    global _CHILDREN_DIE
    if _CHILDREN_DIE:
        return
    _CHILDREN_DIE = True

    def before() -> None:
        global _FORKING
        _FORKING = os.getpid()

    os.register_at_fork(before=before, after_in_child=lambda: die_with_parent(_FORKING))


@contextlib.contextmanager
def stderr_to_devnull():
    """While starting a helper process: fd 2 is /dev/null, so the helper inherits that as its stderr from its first
    instruction, and this process gets its own back after. A helper that fails before its own code runs (its parent
    killed while it reads its start-up data) then leaves no traceback in the parent's stderr."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
