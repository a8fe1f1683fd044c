"""Helpers for trainer tests: a random tiny teacher checkpoint and in-process / CLI training runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.dist_helpers import run_distributed

REPO = Path(__file__).resolve().parents[1]


def _save_teacher(env, directory, preset, arch_overrides, seed):
    import torch

    from megatron_senseflow.models import build_model, transformer_config
    from megatron_senseflow.models.checkpoint_io import save_model
    from megatron_senseflow.models.configs import make_arch

    arch = make_arch(preset, arch_overrides)
    torch.manual_seed(seed)
    model = build_model(arch, transformer_config(arch))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero everywhere (adaLN-Zero init would make every block the identity)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_model(model, arch, directory)
    return True


def make_teacher(directory: Path, preset: str = "tiny-flux", arch: dict | None = None, seed: int = 0) -> Path:
    run_distributed(_save_teacher, 1, str(directory), preset, arch or {}, seed)
    return directory


def _train_body(env, overrides, force_two_pass=False):
    from megatron_senseflow.config import load_config
    from megatron_senseflow.trainer import Trainer

    cfg = load_config("tiny", overrides)
    return Trainer(cfg, env, force_two_pass=force_two_pass).run()


def train_inprocess(world: int, overrides: list[str], tp: int = 1, pp: int = 1, **kw):
    """The trainer in `world` forked gloo ranks (same code as `senseflow train`, minus argument parsing)."""
    overrides = list(overrides) + [f"parallel.tp={tp}", f"parallel.pp={pp}"]
    return run_distributed(_train_body, world, overrides, tp=tp, pp=pp, **kw)


def metrics(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cli(args: list[str], nproc: int = 1, **popen) -> subprocess.Popen:
    """`senseflow train ...` as users run it, in its own process (group)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "megatron_senseflow.cli", "train", *args]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)
