"""The launcher on a real Slurm: sbatch -> srun -> bootstrap -> gloo, and preemption -> save -> requeue -> resume.

Runs a single-node slurmctld + slurmd on localhost (fixture `slurm_cluster`,
tests/slurm_cluster.py). Jobs are written by `senseflow slurm` itself from the
tiny template with `--cpu` (2 "GPUs" = 2 CPU processes on gloo); they run the
small programs of tests/slurm_jobs.py (`--entry`) to pin down the launcher's
contract without the trainer's start-up cost. The real `senseflow train` runs
on two nodes in tests/test_slurm_two_nodes.py.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from megatron_senseflow import cli
from megatron_senseflow.slurm.launch import DONE_MARKER
from tests.dist_helpers import run_distributed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

JOBS = Path(__file__).resolve().parent / "slurm_jobs.py"
# sys.executable as is: the venv's bin/python (resolving it would leave the venv)
PYTHON = sys.executable


def _launch(capsys, out: Path, program: str | None, *extra: str, nodes: int = 1) -> str:
    """`senseflow slurm tiny ... --submit` for 2 CPU tasks on `nodes` nodes; return the job id.
    program None = `senseflow train`."""
    entry = [] if program is None else ["--entry", f"{PYTHON} {JOBS} {program}"]
    rc = cli.main(
        [
            "slurm", "tiny",
            "--nodes", str(nodes), "--gpus-per-node", str(2 // nodes), "--cpu",
            "--output", str(out),
            "--time", "15",
            *entry,
            "--submit",
            *extra,
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    m = re.search(r"submitted job (\d+)", captured.out)
    assert m, captured.out
    return m.group(1)


def _explain(cluster, info, out: Path) -> str:
    logs = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted((out / "logs").glob("*.log")))
    return f"{info}\n{cluster.job_output(info)}\n{logs}"


def test_two_tasks_bootstrap_and_allreduce(slurm_cluster, tmp_path, capsys):
    out = tmp_path / "allreduce"
    job = _launch(capsys, out, "allreduce", "--tp", "2")
    info = slurm_cluster.wait(job, timeout=300)
    assert info.state == "COMPLETED" and info.exit_code == "0:0", _explain(slurm_cluster, info, out)

    results = [json.loads((out / f"allreduce-rank{r}.json").read_text()) for r in range(2)]
    for rank, res in enumerate(results):
        assert res["rank"] == rank and res["slurm_procid"] == str(rank)  # RANK came from SLURM_PROCID
        assert res["local_rank"] == rank  # ... LOCAL_RANK from SLURM_LOCALID
        assert res["world_size"] == 2 and res["backend"] == "gloo"
        assert res["slurm_job_id"] == job
        assert res["allreduce_sum"] == 3.0  # 1 + 2: both tasks joined one process group
        # parallel.tp=2 from the launcher reached megatron's parallel_state
        assert (res["tp"], res["pp"], res["dp"], res["tp_rank"], res["dp_rank"]) == (2, 1, 1, rank, 0)
    assert results[0]["master"] == results[1]["master"]  # one rendezvous address derived alike
    # the batch shell's log and this run's training log, where the layout says
    log = (out / "logs" / f"job{job}-restart0.log").read_text()
    assert re.search(r"^0: rank 0/2 up", log, re.M) and re.search(r"^1: rank 1/2 up", log, re.M), log
    assert "finished" in (out / "logs" / f"slurm-{job}.out").read_text()


def _preempt_once_and_wait(cluster, job: str, out: Path, ready, start_timeout: float, finish_timeout: float):
    """Once `ready()`, do what `#SBATCH --signal=B:USR1@N` does near the time limit (signal the
    batch shell, and only it); then wait for the job to requeue, resume and complete once."""
    deadline = time.monotonic() + start_timeout
    while not ready():
        info = cluster.job_info(job)
        assert info.state in ("PENDING", "RUNNING", "CONFIGURING"), _explain(cluster, info, out)
        assert time.monotonic() < deadline, f"no training steps after {start_timeout} s\n{_explain(cluster, info, out)}"
        time.sleep(0.2)
    cluster.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    info = cluster.wait(job, timeout=finish_timeout)
    why = _explain(cluster, info, out)
    assert info.state == "COMPLETED" and info.exit_code == "0:0", why
    assert info.restarts == 1, why
    return info, why


def _reference(env, out, steps):
    from tests.slurm_jobs import run_counter

    return run_counter(env, out, steps, step_seconds=0.0, stoppable=False)


def _losses(out: Path) -> list[tuple[int, float]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(d["step"], d["loss"]) for d in map(json.loads, lines)]


def test_usr1_saves_requeues_and_resumes_like_an_uninterrupted_run(slurm_cluster, tmp_path, capsys, monkeypatch):
    steps = 24
    out = tmp_path / "counter"
    monkeypatch.setenv("SENSEFLOW_TEST_STEP_SECONDS", "0.3")  # the job inherits the submitting environment
    job = _launch(capsys, out, "counter", f"train.max_steps={steps}")

    ready = lambda: (out / "metrics.jsonl").exists() and len(_losses(out)) >= 3  # noqa: E731
    info, why = _preempt_once_and_wait(slurm_cluster, job, out, ready, start_timeout=240, finish_timeout=400)

    # saved partway, on every rank, at one agreed step
    first = (out / "logs" / f"job{job}-restart0.log").read_text()
    assert "SIGUSR1 -> saved at step" in first, why  # the forwarded signal reached the ranks
    saved = re.findall(r"^[01]: rank [01]: .* -> saved at step (\d+), exiting 0$", first, re.M)
    assert len(saved) == 2 and len(set(saved)) == 1, why
    saved_step = int(saved[0])
    assert 3 <= saved_step < steps, why
    # requeued: a second training log, which resumed from that step and finished
    second = (out / "logs" / f"job{job}-restart1.log").read_text()
    assert re.search(rf"^0: rank 0: resumed from step {saved_step}$", second, re.M), why
    assert re.search(rf"^1: rank 1: resumed from step {saved_step}$", second, re.M), why
    assert f"done at step {steps}" in second, why
    batch = (out / "logs" / f"slurm-{job}.out").read_text()
    assert "USR1: stop requested" in batch and f"requeueing job {job} (restart 1)" in batch, why
    assert "finished" in batch, why
    assert json.loads((out / DONE_MARKER).read_text())["step"] == steps

    # the interrupted run's numbers equal an uninterrupted run of the same loop
    ref = tmp_path / "reference"
    run_distributed(_reference, 2, ref, steps)
    got, want = _losses(out), _losses(ref)
    assert [s for s, _ in got] == list(range(steps))
    assert got == want
    assert json.loads((out / DONE_MARKER).read_text()) == json.loads((ref / DONE_MARKER).read_text())
