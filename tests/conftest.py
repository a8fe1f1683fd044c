"""Shared fixtures (`slurm_cluster`: one real single-node Slurm for the whole session) and how `make test` shares
the tests out over its two processes (pytest-xdist, `--dist loadscope`).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_SLURM_TIMINGS: dict[str, float] = {}

# As many xdist workers as cores: one thread per process (each worker and every process a test starts inherit
# it). Two workers each running torch with a thread per core, beside the 2-rank runs of the other worker, keep
# every core switching between more threads than it has.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) >= (os.cpu_count() or 1):
    os.environ["OMP_NUM_THREADS"] = "1"

# `make test` runs the suite in two pytest-xdist workers, one module per worker at a time (`--dist loadscope`), so
# that a module's fixtures (a trained demo teacher, a converted checkpoint, a reference run) are built once. Modules
# are handed out in this order (`--no-loadscope-reorder`): the ALONE ones first, beside them the LIGHT ones, then
# the other (slow) modules longest first, so that both workers end at about the same time.
# ALONE: modules that run with every slow module held back. The two-node Slurm jobs hung (both slurmd stopped
# answering, the job never finished) in 2 of 5 full runs while other multi-rank tests ran beside them, and never
# when run alone. LIGHT: modules without a slow test that start no gloo ranks: they run beside an ALONE module, on
# the worker it would otherwise leave idle. (DeepSpeed's CPU Adam build beside it was tried: it stretched the
# two-node module from 161 s to 210 s, for no net gain.)
ALONE = ("test_slurm_two_nodes",)
LONGEST_FIRST = (*ALONE, "test_checkpoint_faults", "test_demo", "test_walkthrough", "test_walkthrough_qwen",
                 "test_resume", "test_run_endings", "test_convert_verify", "test_recipes_run", "test_slurm_cluster",
                 "test_cli_errors", "test_offload", "test_trainer", "test_lora", "test_in_loop_eval", "test_convert",
                 "test_sid", "test_recipe_fidelity", "test_family_move", "test_model_parity", "test_new_families", "test_single_file")
LIGHT: set[str] = set()  # filled at collection


def pytest_configure(config):
    if os.environ.get("OMP_NUM_THREADS") == "1":
        import torch

        torch.set_num_threads(1)  # torch may have been imported (and sized its pool) before this conftest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """ALONE, then LIGHT, then the slow modules longest first; every test runs either way, in file order inside a
    module."""
    modules = {_module_name(item) for item in items}
    slow = {_module_name(item) for item in items if item.get_closest_marker("slow")}
    # a quick module that still starts gloo ranks (tests/dist_helpers, trainer_helpers) is no LIGHT one
    multi_rank = {_module_name(item) for item in items
                  if any(hasattr(item.module, name) for name in ("run_distributed", "train_inprocess"))}
    LIGHT.clear()
    LIGHT.update(modules - slow - multi_rank - set(ALONE))
    order = [*ALONE, *sorted(LIGHT), *(m for m in LONGEST_FIRST if m not in ALONE and m not in LIGHT)]
    rank = {name: i for i, name in enumerate(order)}
    items.sort(key=lambda item: rank.get(_module_name(item), len(rank)))


class _Room:
    """One machine, two workers: a test of an ALONE module holds the room alone, every other test shares it. A
    readers-writer lock on two flock files; the gate makes a waiting ALONE module go before tests that come later."""

    def __init__(self, uid: str):
        base = Path(tempfile.gettempdir()) / f"senseflow-tests-{uid}"
        self.gate, self.room = open(f"{base}.gate", "a+"), open(f"{base}.room", "a+")
        self.alone = False

    def enter(self, alone: bool) -> None:
        if alone:
            if not self.alone:
                fcntl.flock(self.gate, fcntl.LOCK_EX)
                fcntl.flock(self.room, fcntl.LOCK_EX)
                self.alone = True
            return
        fcntl.flock(self.gate, fcntl.LOCK_SH)
        fcntl.flock(self.room, fcntl.LOCK_SH)
        fcntl.flock(self.gate, fcntl.LOCK_UN)

    def leave(self, keep_alone: bool) -> None:
        if self.alone and keep_alone:
            return
        fcntl.flock(self.room, fcntl.LOCK_UN)
        if self.alone:
            fcntl.flock(self.gate, fcntl.LOCK_UN)
            self.alone = False


_ROOM: _Room | None = None


def _module_name(item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under xdist (`make test`), each test's setup, call and teardown run inside the room (see _Room)."""
    global _ROOM
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if uid is None:  # one process: nothing runs beside anything
        yield
        return
    if _ROOM is None:
        _ROOM = _Room(uid)
    if _module_name(item) in LIGHT:  # runs beside anything, an ALONE module included
        yield
        return
    alone = _module_name(item) in ALONE
    _ROOM.enter(alone)
    try:
        yield
    finally:  # an ALONE module keeps the room until its last test (its cluster fixture) has ended
        _ROOM.leave(keep_alone=alone and nextitem is not None and _module_name(nextitem) == _module_name(item))


def running_cluster(cluster, what: str):
    """Start `cluster`, yield it, stop it; skip (or fail under SENSEFLOW_REQUIRE_SLURM=1) with the reason
    when this machine cannot run it."""
    from tests.slurm_cluster import SlurmUnavailable

    try:
        cluster.start()
    except SlurmUnavailable as e:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
        if os.environ.get("SENSEFLOW_REQUIRE_SLURM") == "1":
            pytest.fail(f"SENSEFLOW_REQUIRE_SLURM=1 but {e}")
        pytest.skip(f"{what} skipped: {e}")
    except BaseException:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running slurmctld + slurmd on localhost (tests/slurm_cluster.py); skips when Slurm cannot be installed."""
    from tests.slurm_cluster import SlurmCluster

    for cluster in running_cluster(SlurmCluster(), "real-Slurm tests"):
        _SLURM_TIMINGS.update(cluster.timings)
        yield cluster


def pytest_terminal_summary(terminalreporter):
    if _SLURM_TIMINGS:
        t = _SLURM_TIMINGS
        terminalreporter.write_line(
            f"slurm fixture: install {t.get('install_s', 0):.1f} s (0 = already installed), "
            f"daemons up and node idle in {t.get('start_s', 0):.1f} s"
        )
