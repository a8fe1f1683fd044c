"""Checkpoint and resume through the real `senseflow train` command: a stopped, killed (-9) or signalled
run, rerun with the same command, continues with exactly the losses of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.trainer_helpers import cli, make_teacher, metrics, train_inprocess

pytestmark = pytest.mark.slow

VOLATILE = ("perf/", "mem/")  # wall-clock and memory readings differ between any two runs


def _losses(rows: list[dict]) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows}


def _args(teacher: Path, out: Path, steps: int, every: int) -> list[str]:
    return ["tiny", f"roles.teacher.checkpoint={teacher}", f"train.output_dir={out}", f"train.max_steps={steps}",
            f"checkpoint.every={every}", "logging.log_every=1", "logging.tensorboard=false"]


def _finish(proc, timeout=300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _wait_for_step(out: Path, step: int, proc, timeout=300):
    deadline = time.monotonic() + timeout
    path = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stdout.read()[-3000:]}")
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout}s")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher") / "ckpt")


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _finish(cli(_args(teacher, out, 6, 2)))
    assert json.loads((out / "DONE").read_text()) == {"step": 6}
    return _losses(metrics(out))


def test_stop_and_rerun_continues_bit_identically_past_a_half_written_checkpoint(teacher, reference, tmp_path):
    """A run that stopped at step 3 (its final save, between the periodic ones) and left a half-written
    checkpoint of a later save behind (what a crash in the middle of a save leaves), rerun with the same
    command: the half-written one is ignored and removed, and steps 4-6 repeat an uninterrupted run's losses.
    (Two tests shared these runs: stop and rerun; a half-written checkpoint.)"""
    _finish(cli(_args(teacher, tmp_path, 3, 2)))
    ck = tmp_path / "checkpoints"
    crashed = ck / "step_00000004.tmp"
    (crashed / "generator").mkdir(parents=True)
    (crashed / "generator" / "garbage.distcp").write_bytes(b"\0" * 100)
    log = _finish(cli(_args(teacher, tmp_path, 6, 2)))
    assert "resumed at step 3" in log and not crashed.exists()
    assert "[step 5/6] " in log and "ETA" in log.split("[step 5/6] ")[1].splitlines()[0]  # rate and time left
    got = _losses(metrics(tmp_path))
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == reference[step], step  # every loss term, to the last digit


def test_kill_9_then_same_command_resumes_from_latest_complete(teacher, reference, tmp_path):
    proc = cli(_args(teacher, tmp_path, 6, 2))
    _wait_for_step(tmp_path, 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert latest in ("step_00000002", "step_00000004")
    log = _finish(cli(_args(teacher, tmp_path, 6, 2)))
    resumed = int(latest.split("_")[1])
    assert f"resumed at step {resumed}" in log
    got = _losses(metrics(tmp_path))
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # rows the killed run wrote after its checkpoint were replaced
    assert all(got[s] == reference[s] for s in range(1, 7))


def test_sigusr1_saves_at_next_step_boundary_and_exits_0(teacher, reference, tmp_path):
    proc = cli(_args(teacher, tmp_path, 6, 0))
    _wait_for_step(tmp_path, 2, proc)
    os.killpg(proc.pid, signal.SIGUSR1)
    log = _finish(proc)
    assert "SIGUSR1: saved step" in log
    assert not (tmp_path / "DONE").exists()  # the Slurm job script requeues a run without DONE
    stopped = int((tmp_path / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 2 <= stopped < 6
    # the job script requeues as soon as this appears (ranks hung in teardown do not hold it back)
    assert json.loads((tmp_path / "STOPPED").read_text()) == {"step": stopped, "stopped_at": stopped}
    _finish(cli(_args(teacher, tmp_path, 6, 0)))
    assert json.loads((tmp_path / "DONE").read_text()) == {"step": 6}
    got = _losses(metrics(tmp_path))
    assert all(got[s] == reference[s] for s in range(1, 7))


def _stop_during_async_save(env, overrides):
    """A USR1 that arrives while the periodic save of step 2 is still being written (its writers are
    held back so that it is in flight at step 3, as a 340 GB save would be)."""
    from megatron_senseflow import signals
    from megatron_senseflow.checkpoint import CheckpointManager
    from megatron_senseflow.config import load_config
    from megatron_senseflow.trainer import Trainer

    trainer = Trainer(load_config("tiny", overrides), env)
    saves = []
    real_save = CheckpointManager.save
    trainer.ckpt.save = lambda step, async_save=False: saves.append(step) or real_save(trainer.ckpt, step, async_save)
    trainer.ckpt.maybe_finalize = lambda: None
    signals.received = lambda: "SIGUSR1" if trainer.step >= 3 else None
    assert trainer.run() == 0
    return saves


def test_stop_during_a_save_makes_that_save_the_stop_save(teacher, reference, tmp_path):
    from tests.dist_helpers import run_distributed

    args = _args(teacher, tmp_path, 6, 2)[1:] + ["checkpoint.async_save=true"]
    saves = run_distributed(_stop_during_async_save, 1, args)[0]
    assert saves == [2]  # no second full save for the stop
    assert json.loads((tmp_path / "STOPPED").read_text()) == {"step": 2, "stopped_at": 3}
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    log = _finish(cli(_args(teacher, tmp_path, 6, 2)))
    assert "resumed at step 2" in log
    got = _losses(metrics(tmp_path))
    assert all(got[s] == reference[s] for s in range(1, 7))


def test_resume_on_another_layout_reshards(teacher, reference, tmp_path):
    """Saved at TP=2, resumed at PP=2 (model and distributed-optimizer states resharded at load)."""
    base = ["roles.teacher.checkpoint=" + str(teacher), f"train.output_dir={tmp_path}", "checkpoint.every=2",
            "logging.log_every=1", "logging.tensorboard=false"]
    train_inprocess(2, base + ["train.max_steps=2"], tp=2)
    train_inprocess(2, base + ["train.max_steps=4", "data.micro_batch_size=1", "parallel.num_microbatches=2"], pp=2)
    got = _losses(metrics(tmp_path))
    for step in (3, 4):
        for k in ("gen/dmd", "gen/isg", "fake/fm", "disc/loss"):
            if k in reference[step]:
                assert got[step][k] == pytest.approx(reference[step][k], rel=1e-4), (step, k)


def test_warns_once_when_a_step_and_two_saves_do_not_fit_the_signal_lead(monkeypatch, capsys):
    from types import SimpleNamespace

    from megatron_senseflow.trainer import Trainer

    fake = SimpleNamespace(ckpt=SimpleNamespace(last_save_seconds=250.0), _lead_checked=False,
                           env=SimpleNamespace(is_main=True))
    monkeypatch.setenv("SENSEFLOW_SIGNAL_LEAD", "600")
    Trainer._check_signal_lead(fake, 40.0, 2)  # 20 s a step + 2 x 250 s = 520 s: fits
    assert capsys.readouterr().out == ""
    fake._lead_checked = False
    fake.ckpt.last_save_seconds = 300.0
    Trainer._check_signal_lead(fake, 40.0, 2)  # 620 s
    out = capsys.readouterr().out
    assert "a stop needs up to 620 s but Slurm signals only 600 s before the time limit; raise --signal-lead to at least 745 s" in out
    Trainer._check_signal_lead(fake, 40.0, 2)
    assert capsys.readouterr().out == ""  # once per run
