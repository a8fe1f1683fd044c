"""How runs end, through the real `senseflow train --nproc 2` with data-loader workers: a failed rank or
Ctrl-C ends every rank and every worker within seconds, with one line and the exit code of the cause. And a
checkpoint is valid at every step, also before the generator's first update (the trainer in forked ranks)."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.dist_helpers import run_distributed
from tests.trainer_helpers import cli, make_teacher, metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The demo's encoded digit shards and a random teacher of the demo's architecture."""
    from megatron_senseflow import demo

    root = tmp_path_factory.mktemp("digits")
    data = demo.write_data(root, demo.digits_text())
    teacher = make_teacher(root / "teacher", arch=demo.TEACHER)
    return data, teacher


def _recipe(digits, out: Path, steps: int) -> Path:
    import yaml

    from megatron_senseflow import demo

    data, teacher = digits
    r = demo.demo_recipe(teacher, data, out, steps, 2, 1.0)
    r["data"].update(num_workers=2, micro_batch_size=8)
    r["checkpoint"]["every"] = 2
    r["logging"].update(log_every=1, image_every=0, tensorboard=False)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _run_until_step(recipe: Path, out: Path, step: int, timeout=300):
    """Start the launcher in its own session (as a terminal would) and wait until `step` is logged; returns
    the process and every process it started by then (ranks and their loader workers)."""
    proc = cli([str(recipe), "--nproc", "2"], nproc=1)
    deadline, seen = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        for p in _tree(proc.pid):
            seen[p.pid] = p
        rows = metrics(out) if (out / "metrics.jsonl").exists() else []
        if rows and rows[-1]["step"] >= step and len(seen) >= 6:  # 2 ranks, 2 workers each
            return proc, list(seen.values())
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read()[-3000:])
        time.sleep(0.1)
    raise AssertionError(f"no step {step} in {timeout}s")


def _all_gone(procs: list[psutil.Process], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs):
            return True
        time.sleep(0.1)
    return False


def test_a_rank_that_dies_ends_every_rank_and_worker(digits, tmp_path):
    out = tmp_path / "run"
    proc, started = _run_until_step(_recipe(digits, out, 200), out, 2)
    ranks = [p for p in psutil.Process(proc.pid).children() if "train_cli" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    ranks[1].kill()  # a crash or a lost process, as a node failure looks to the other ranks
    t0 = time.monotonic()
    text, _ = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 20, "the run did not end within seconds"
    assert proc.returncode == 1, text[-3000:]
    assert "senseflow train: rank 1 was killed by signal 9; the other ranks were stopped." in text
    assert "Traceback" not in text
    assert _all_gone(started, 10), [p.pid for p in started if p.is_running()]


def test_ctrl_c_ends_every_rank_and_worker_and_names_the_last_checkpoint(digits, tmp_path):
    out = tmp_path / "run"
    proc, started = _run_until_step(_recipe(digits, out, 200), out, 3)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does to the foreground group
    t0 = time.monotonic()
    text, _ = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 20
    assert proc.returncode == 130, text[-3000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    lines = [ln for ln in text.splitlines() if ln.startswith("senseflow train:")]
    assert lines == [f"senseflow train: interrupted; the last complete checkpoint is {out / 'checkpoints' / latest} "
                     "(rerun the same command to resume from it)."], text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert _all_gone(started, 10)


def _train_and_say(env, overrides: list[str]):
    """One run of the trainer on this rank; its exit code and what it printed."""
    import contextlib
    import io

    from megatron_senseflow.config import load_config
    from megatron_senseflow.trainer import Trainer

    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        code = Trainer(load_config("tiny", overrides), env).run()
    return code, said.getvalue()


def test_a_checkpoint_before_the_generators_first_update_resumes_exactly(tmp_path):
    """TTUR 2 and one iteration: the save comes before the generator's optimizer ever stepped. The subject is the
    checkpoint, not how a process ends, so the three runs are the trainer in forked gloo ranks (what
    `senseflow train --nproc 2` runs in each rank, without starting three interpreters per run)."""
    teacher = make_teacher(tmp_path / "teacher")
    args = [f"roles.teacher.checkpoint={teacher}", "distill.ttur=2", "checkpoint.every=1", "logging.log_every=1",
            "logging.tensorboard=false", "parallel.tp=1", "parallel.pp=1"]

    def run(out, steps):
        results = run_distributed(_train_and_say, 2, [*args, f"train.output_dir={out}", f"train.max_steps={steps}"])
        assert [code for code, _ in results] == [0, 0], results
        return results[0][1]

    run(tmp_path / "a", 1)
    assert json.loads((tmp_path / "a" / "DONE").read_text()) == {"step": 1}
    assert "resumed at step 1" in run(tmp_path / "a", 3)
    run(tmp_path / "b", 3)
    drop = ("perf/", "mem/")
    a, b = ({r["step"]: {k: v for k, v in r.items() if not k.startswith(drop)} for r in metrics(d)}
            for d in (tmp_path / "a", tmp_path / "b"))
    assert a == b
