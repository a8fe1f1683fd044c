"""In-loop evaluation (eval.every): the same numbers at DP1 and DP2, and losses untouched by it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.dist_helpers import run_distributed
from tests.trainer_helpers import make_teacher, metrics, train_inprocess

VOLATILE = ("perf/", "mem/")


class TinyFeatures(torch.nn.Module):
    """A stand-in for Inception with its calling convention: uint8 [N, 3, H, W] -> [N, 8]."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(8, 3, 3, 3, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.conv2d(x.float() / 255.0, self.w, padding=1)
        return torch.tanh(y).mean(dim=(2, 3)) + y.std(dim=(2, 3))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    feats = root / "features.pt"
    torch.jit.script(TinyFeatures()).save(str(feats))
    return make_teacher(root / "teacher"), feats


def _eval_at_start(env, overrides):
    from megatron_senseflow.config import load_config
    from megatron_senseflow.trainer import Trainer

    tr = Trainer(load_config("tiny", overrides), env)
    return tr.evaluator.run()


def test_dp2_gives_the_numbers_of_dp1_on_the_same_samples(setup, tmp_path):
    teacher, feats = setup
    base = [f"roles.teacher.checkpoint={teacher}", "eval.every=1", "eval.num_samples=5", f"eval.features={feats}",
            "roles.generator.ema_decay=0.9"]
    one = run_distributed(_eval_at_start, 1, base + [f"train.output_dir={tmp_path / 'dp1'}"])[0]
    two = run_distributed(_eval_at_start, 2, base + [f"train.output_dir={tmp_path / 'dp2'}"])[0]
    assert set(one) == {"eval/fd_stochastic", "eval/fd_euler", "eval/ema_fd_stochastic", "eval/ema_fd_euler"}
    assert all(np.isfinite(v) and v > 0 for v in one.values())
    for k in one:  # 5 samples over 2 replicas (3 + 2, one padded): gathered in sample order
        assert two[k] == pytest.approx(one[k], rel=1e-9, abs=1e-12), k
    # the reference features were computed once and cached
    assert len(list((tmp_path / "dp1" / "eval").glob("reference-*.npy"))) == 1


def test_enabling_it_leaves_the_losses_bit_identical(setup, tmp_path):
    teacher, feats = setup
    base = [f"roles.teacher.checkpoint={teacher}", "train.max_steps=4", "logging.log_every=1",
            "logging.tensorboard=false", "checkpoint.every=0", "roles.generator.ema_decay=0.9"]
    train_inprocess(2, base + [f"train.output_dir={tmp_path / 'off'}"])
    train_inprocess(2, base + [f"train.output_dir={tmp_path / 'on'}", "eval.every=2", "eval.num_samples=4",
                               f"eval.features={feats}"])
    off = {r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in metrics(tmp_path / "off")}
    on = {r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in metrics(tmp_path / "on")}
    assert sorted(on) == sorted(off) == [1, 2, 3, 4]
    for step in off:
        evals = {k: v for k, v in on[step].items() if k.startswith("eval/")}
        assert bool(evals) == (step % 2 == 0), step
        assert {k: v for k, v in on[step].items() if not k.startswith("eval/")} == off[step], step


def test_eval_without_features_is_one_sentence():
    from megatron_senseflow.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="eval.every is set but eval.features is not"):
        load_config("tiny", ["eval.every=10"])
