"""Shared fixtures. `slurm_cluster`: one real single-node Slurm for the whole session."""
from __future__ import annotations

import os
import shutil

import pytest

_SLURM_TIMINGS: dict[str, float] = {}


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
