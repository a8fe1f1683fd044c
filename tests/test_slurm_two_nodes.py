"""Two Slurm nodes, each in its own network namespace: rendezvous across nodes, preemption, a lost node.

The cluster (tests/slurm_cluster.py `TwoNodeCluster`): one slurmctld on a
bridge at 10.77.0.1 and slurmd "nodes" n1 (10.77.0.2) and n2 (10.77.0.3) in
namespaces of their own; the names n1/n2 resolve nowhere, so the product must
reach rank 0 through the node's NodeAddr. Jobs are written by `senseflow slurm`
with `--nodes 2 --gpus-per-node 1 --cpu`: one gloo rank per node. It needs root
(network namespaces, slurmd); without it the module skips and says why, and
SENSEFLOW_REQUIRE_SLURM=1 turns that skip into a failure.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from megatron_senseflow.slurm.launch import DONE_MARKER
from tests.test_slurm_cluster import _explain, _launch, _preempt_once_and_wait

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

VOLATILE = ("perf/", "mem/")  # wall-clock and memory readings differ between any two runs


@pytest.fixture(scope="module")
def two_nodes():
    from tests.conftest import running_cluster
    from tests.slurm_cluster import TwoNodeCluster

    yield from running_cluster(TwoNodeCluster(), "two-node Slurm tests")


REFERENCE_STEPS = 30


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from tests.trainer_helpers import make_teacher

    return make_teacher(tmp_path_factory.mktemp("teacher") / "ckpt")


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory) -> dict[int, dict]:
    """The losses of a DP=2 run of the tiny recipe that was never interrupted, 30 steps: both drills compare with
    its first steps (its learning rate is constant after warm-up and the checkpoint interval changes no loss, so
    a run of any length or interval has these losses at its steps)."""
    from tests.trainer_helpers import train_inprocess

    out = tmp_path_factory.mktemp("reference")
    train_inprocess(2, [f"roles.teacher.checkpoint={teacher}", f"train.max_steps={REFERENCE_STEPS}",
                        "logging.log_every=1", f"train.output_dir={out}", "checkpoint.every=0", "checkpoint.at_end=false"])
    return _trainer_rows(out)


def _equals_uninterrupted(out: Path, reference: dict[int, dict], steps: int) -> None:
    """Every loss term of every step equals the DP=2 run that was never interrupted."""
    got = _trainer_rows(out)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert got[step] == reference[step], step


def _launch2(cluster, monkeypatch, capsys, out: Path, program: str | None, *extra: str) -> str:
    with monkeypatch.context() as m:
        cluster.job_environment(m)
        return _launch(capsys, out, program, "--tp", "1", *extra, nodes=2)


def _trainer_rows(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows}


def test_rendezvous_across_nodes_by_node_address_despite_a_polluted_environment(two_nodes, tmp_path, capsys, monkeypatch):
    # what a login profile or an interactive allocation leaves in the submitting shell
    for name, value in (("MASTER_ADDR", "localhost"), ("MASTER_PORT", "1"), ("RANK", "7"), ("WORLD_SIZE", "9"),
                        ("SLURM_MEM_PER_CPU", "1"), ("SLURM_MEM_PER_NODE", "1")):
        monkeypatch.setenv(name, value)
    out = tmp_path / "allreduce"
    job = _launch2(two_nodes, monkeypatch, capsys, out, "allreduce")
    info = two_nodes.wait(job, timeout=300)
    assert info.state == "COMPLETED" and info.exit_code == "0:0", _explain(two_nodes, info, out)
    results = [json.loads((out / f"allreduce-rank{r}.json").read_text()) for r in range(2)]
    assert [r["slurm_node"] for r in results] == ["n1", "n2"]  # one rank per node, rank 0 on the first
    assert [r["rank"] for r in results] == [0, 1] and all(r["world_size"] == 2 for r in results)
    assert all(r["allreduce_sum"] == 3.0 for r in results)
    addr, port = results[0]["master"].split(":")
    assert addr == two_nodes.addr("n1") and results[1]["master"] == results[0]["master"]
    assert 10000 <= int(port) < 30000  # below the ephemeral range
    assert f"rendezvous {two_nodes.addr('n1')}" in (out / "logs" / f"slurm-{job}.out").read_text()


def test_senseflow_train_on_two_nodes_preempted_requeued_equals_uninterrupted(two_nodes, teacher, reference, tmp_path,
                                                                              capsys, monkeypatch):
    """The tiny recipe through the real trainer: DP=2 over n1 and n2, USR1 partway, requeue, resume, same losses."""
    steps = REFERENCE_STEPS  # leaves the signal seconds to arrive before the run ends, even on a loaded machine
    overrides = [f"roles.teacher.checkpoint={teacher}", f"train.max_steps={steps}", "checkpoint.every=10",
                 "logging.log_every=1"]
    out = tmp_path / "run"
    job = _launch2(two_nodes, monkeypatch, capsys, out, None, *overrides)

    ready = lambda: (out / "metrics.jsonl").exists() and len(_trainer_rows(out)) >= 2  # noqa: E731
    info, why = _preempt_once_and_wait(two_nodes, job, out, ready, start_timeout=300, finish_timeout=600)
    first = (out / "logs" / f"job{job}-restart0.log").read_text()
    # the batch script forwards USR1 to both ranks; whichever has it first, all stop at the same step, and rank 0
    # names the signal if it was first, "signal on another rank" if the rank on n2 was (trainer._stop_requested)
    m = re.search(r"^0: \[senseflow\] (?:SIGUSR1|signal on another rank): saved step (\d+), exiting for requeue$",
                  first, re.M)
    assert m, why
    stopped = int(m.group(1))
    assert 2 <= stopped < steps, why
    second = (out / "logs" / f"job{job}-restart1.log").read_text()
    assert re.search(rf"^0: \[senseflow\] senseflow on 2 rank\(s\) tp=1 pp=1 dp=2; .*resumed at step {stopped}$",
                     second, re.M), why
    assert json.loads((out / DONE_MARKER).read_text()) == {"step": steps}
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    _equals_uninterrupted(out, reference, steps)


def _wait_for(what: str, cond, timeout: float, explain) -> float:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s\n{explain()}"
        time.sleep(0.2)
    return time.monotonic()


def test_lost_node_requeues_and_resumes_from_the_last_checkpoint(two_nodes, teacher, reference, tmp_path, capsys,
                                                                 monkeypatch):
    """Node-loss drill: SIGKILL to everything on n2 (its slurmd, slurmstepd and rank) mid-run. The rank on n1
    aborts, the job script requeues because the run published checkpoints since it started, the node comes
    back, the job resumes from the last checkpoint and ends with the uninterrupted run's losses."""
    steps = 16
    overrides = [f"roles.teacher.checkpoint={teacher}", f"train.max_steps={steps}", "checkpoint.every=4",
                 "logging.log_every=1"]
    out = tmp_path / "run"
    monkeypatch.setenv("SENSEFLOW_KILL_SLACK", "15")  # srun's own kill takes KillWait (10 s here) + 2
    job = _launch2(two_nodes, monkeypatch, capsys, out, None, "--teardown-grace", "5", *overrides)
    batch_log = out / "logs" / f"slurm-{job}.out"
    explain = lambda: _explain(two_nodes, two_nodes.job_info(job), out)  # noqa: E731
    latest = lambda: (out / "checkpoints" / "latest").read_text().strip() if (out / "checkpoints" / "latest").exists() else ""  # noqa: E731
    batch = lambda: batch_log.read_text(errors="replace") if batch_log.exists() else ""  # noqa: E731

    _wait_for("second checkpoint", lambda: latest() >= "step_00000008", 300, explain)
    t = {"kill": time.monotonic()}
    killed = two_nodes.kill_node("n2")
    assert killed, "nothing ran in n2's namespace"
    # the rank on n1 fails on its broken collective and says so; srun cannot reach n2's tasks and
    # waits for Slurm to declare n2 down (300 s), so the job script ends the step after its grace
    t["abort"] = _wait_for("abort", lambda: (out / "FAILED").exists(), 180, explain)
    t["step_ended"] = _wait_for("end of the step", lambda: "ending it" in batch() or "exited with status" in batch(), 120, explain)
    t["requeue"] = _wait_for("requeue", lambda: f"requeueing job {job} (restart 1)" in batch(), 60, explain)
    saved = latest()
    two_nodes.start_node("n2")  # the node is back (a reboot, a replaced host)
    t["node_back"] = time.monotonic()
    restart1 = out / "logs" / f"job{job}-restart1.log"
    t["resume"] = _wait_for("resume", lambda: restart1.exists() and "resumed at step" in restart1.read_text(), 300, explain)
    info = two_nodes.wait(job, timeout=300)
    t["finish"] = time.monotonic()
    why = _explain(two_nodes, info, out)
    assert info.state == "COMPLETED" and info.exit_code == "0:0", why
    text = batch()
    # Slurm may deliver the terminate request for the lost run to n2 once its slurmd is back, after the
    # requeued job (same id) started there: the rank takes that SIGTERM as a stop, saves and requeues
    # once more. Costs a restart, loses no step; any further restart must be such a clean stop.
    assert info.restarts >= 1, why
    assert text.count("not finished: requeueing") == info.restarts - 1, why
    assert re.search(rf"failed with status \d+ after progress \(none -> {saved}\): requeueing job {job}", text), why
    resumed = int(saved.split("_")[1])
    assert f"resumed at step {resumed}" in restart1.read_text(), why

    timeline = {k: round(v - t["kill"], 1) for k, v in t.items()}
    (out / "node-loss-timeline.json").write_text(json.dumps(timeline))
    print(f"\nnode-loss drill (seconds after the kill): {timeline}; resumed from {saved}")

    _equals_uninterrupted(out, reference, steps)
