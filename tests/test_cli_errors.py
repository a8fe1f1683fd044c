"""A person's mistakes through the real `senseflow train` command: exit code 2, one line, no traceback,
before anything is built; and a working directory with its own `models/` and `data/` packages."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer_helpers import make_teacher

REPO = Path(__file__).resolve().parents[1]


def senseflow(*args: str, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "megatron_senseflow.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("senseflow")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {"flux": make_teacher(root / "flux"), "sd3": make_teacher(root / "sd3", preset="tiny-sd3")}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["not_a_checkpoint", "other_family", "arch_disagrees", "lr_negative", "lr_nan",
                                  "nproc_2", "stand_in_teacher", "stand_in_data", "shallow_dinov2"])
def test_bad_input_is_one_sentence_and_exit_2(case, checkpoints, tmp_path):
    from transformers import Dinov2Config

    empty = tmp_path / "empty"
    empty.mkdir()
    Dinov2Config(hidden_size=32, num_hidden_layers=6, num_attention_heads=2).save_pretrained(tmp_path / "dinov2")
    out = f"train.output_dir={tmp_path / 'run'}"
    args, expect = {
        "not_a_checkpoint": (["tiny", f"roles.teacher.checkpoint={empty}"], "is not a senseflow model checkpoint"),
        "other_family": (["tiny", f"roles.teacher.checkpoint={checkpoints['sd3']}"], "holds a SD3 model"),
        "arch_disagrees": (["tiny", f"roles.teacher.checkpoint={checkpoints['flux']}", "model.arch.num_layers=3"],
                           "model.arch.num_layers=3 disagrees with the teacher checkpoint"),
        "lr_negative": (["tiny", "roles.generator.optimizer.lr=-1"], "roles.generator.optimizer.lr=-1.0 must be greater than 0"),
        "lr_nan": (["tiny", "roles.fake_score.optimizer.lr=nan"], "roles.fake_score.optimizer.lr=nan must be a finite number"),
        "nproc_2": (["tiny", "--nproc", "2", f"roles.teacher.checkpoint={checkpoints['sd3']}"], "holds a SD3 model"),
        # a training recipe refuses every stand-in (only test and demo recipes may run on them)
        "stand_in_teacher": (["flux_dev"], "roles.teacher.checkpoint is not set: a flux-dev run needs the teacher"),
        "stand_in_data": (["sd35_medium", f"roles.teacher.checkpoint={checkpoints['sd3']}",
                           "roles.discriminator.enabled=false"], "data.path is not set: a sd35-medium run needs shards"),
        # a DINOv2 shallower than the recipe's taps, refused from its config.json before any model is built
        "shallow_dinov2": (["tiny", f"roles.discriminator.dinov2={tmp_path / 'dinov2'}",
                            "roles.discriminator.feature_layers=[2,5,8]"], "has 6 blocks, but roles.discriminator"),
    }[case]
    line = one_line_error(senseflow("train", *args, out))
    assert expect in line, line
    assert not (tmp_path / "run").exists()  # refused before anything was built or written


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["dry_run", "slurm"])
def test_a_teacher_of_another_architecture_is_refused_by_dry_run_and_slurm_too(verb, checkpoints, tmp_path):
    """`train --dry-run` and `senseflow slurm` read the architecture from the teacher checkpoint as `train` does:
    a disagreeing model.arch or another family is one sentence, exit 2, and no batch script is written."""
    for overrides, expect in (
        ([f"roles.teacher.checkpoint={checkpoints['sd3']}"], "holds a SD3 model"),
        ([f"roles.teacher.checkpoint={checkpoints['flux']}", "model.arch.num_layers=3"],
         "model.arch.num_layers=3 disagrees with the teacher checkpoint"),
    ):
        if verb == "dry_run":
            r = senseflow("train", "tiny", "--dry-run", *overrides)
        else:
            r = senseflow("slurm", "tiny", "--nodes", "1", "--gpus-per-node", "2", "--cpu",
                          "--output", str(tmp_path / "run"), *overrides)
        line = one_line_error(r)
        assert expect in line, line
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_runs_from_a_directory_with_its_own_models_and_data_packages(checkpoints, tmp_path):
    for name in ("models", "data", "tools", "slurm"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} package was imported')\n")
    r = senseflow("train", "tiny", f"roles.teacher.checkpoint={checkpoints['flux']}", "train.max_steps=1",
                  f"train.output_dir={tmp_path / 'run'}", "logging.tensorboard=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "DONE").is_file()
    # a test recipe may run on stand-ins, and the banner names each one
    assert "[senseflow] stand-in: synthetic data" in r.stdout, r.stdout
    # the same command again: a finished run says so plainly
    again = senseflow("train", "tiny", f"roles.teacher.checkpoint={checkpoints['flux']}", "train.max_steps=1",
                      f"train.output_dir={tmp_path / 'run'}", "logging.tensorboard=false", cwd=tmp_path)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout[-2000:]
