"""Moving FLUX.1 and SD3.x into family modules (issue 26) changed no number: the losses of tiny runs equal the ones
recorded before the move, bit for bit.

`tests/golden/family_move_losses.json` was written by this file's `record()` on the code before the move (commit in
the file). One 2-rank launch (TP=2) trains four tiny runs from the same random teachers and returns every loss
term of every step: FLUX SenseFlow (guidance embedding, GAN, ISG on the sigma grid, IDA, EMA), SD3.5-like SenseFlow
(real CFG, the SD3.5 trainers' table laws and ISG grid, MMDiT-X dual attention), FLUX SiD (CFG and embedding, the
Jacobian products through teacher and fake score) and SD3 with LoRA students under full recompute.

Bit-identical needs the same float kernels: with 1 thread per rank the CPU results depend on torch's version, the
CPU's vector extension (`torch.backends.cpu.get_cpu_capability()`) and the CPU itself (110 of the 232 numbers
differ in their last bits between an AMD EPYC and the first recording's machine, both AVX512). The golden file holds
one recording per environment, each made on the code before the move. On a recorded environment the comparison is
exact; on another one, the numbers are compared to the first recording to 1e-3 relative (the two recordings differ
by up to 5.2e-5 relative after 2-4 steps, as rounding grows through the updates; a change in a loss moves it by
far more), and the assertion message says which comparison ran.

    python -m tests.test_family_move   # adds this environment's recording (on the commit the file names only)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.dist_helpers import run_distributed
from tests.trainer_helpers import make_teacher

pytestmark = pytest.mark.slow
GOLDEN = Path(__file__).parent / "golden" / "family_move_losses.json"

SD3_LAWS = ["distill.guidance_mode=cfg", "distill.dmd_guidance=[2.0,8.0]", "distill.isg_guidance=[2.0,4.0]",
            "distill.shift=3.0", "distill.dmd_timesteps.kind=uniform_index", "distill.dmd_timesteps.shift=3.0",
            "distill.fake_timesteps.shift=3.0", "distill.isg_grid=scheduler_index", "distill.isg_margin=50",
            "distill.isg_weight=0.5", "distill.ida_lambda=0.98", "distill.gan_weight=0.1",
            "distill.gan_time_weight=scheduler_table_sq"]
RUNS = {
    "flux_senseflow": ("tiny-flux", ["train.max_steps=4", "roles.generator.ema_decay=0.9"]),
    "sd3_senseflow": ("tiny-sd3", ["model.preset=tiny-sd3", "train.max_steps=4", *SD3_LAWS]),
    "flux_sid": ("tiny-flux", ["method=sid", "model.student_guidance_embeds=true", "train.max_steps=3",
                               "distill.ttur=1", "distill.guidance_mode=cfg_and_embedding", "distill.fake_guidance=2.0",
                               "distill.dmd_guidance=[2.0,2.0]", "distill.backward_sim_prob=1.0",
                               "distill.anchor_draw=per_iteration"]),
    "sd3_lora_recompute": ("tiny-sd3", ["model.preset=tiny-sd3", "train.max_steps=4", "model.recompute=full",
                                        "roles.generator.lora.rank=2", "roles.fake_score.lora.rank=2", *SD3_LAWS]),
}


def _runs_body(env, teachers: dict, out: str):
    from megatron_senseflow.config import load_config
    from megatron_senseflow.trainer import Trainer

    logs = {}
    for name, (preset, overrides) in RUNS.items():
        run_dir = Path(out) / name
        cfg = load_config("tiny", [*overrides, f"roles.teacher.checkpoint={teachers[preset]}", "parallel.tp=2",
                                   f"train.output_dir={run_dir}", "checkpoint.every=0", "checkpoint.at_end=false",
                                   "logging.tensorboard=false"])
        Trainer(cfg, env).run()
        if env.is_main:
            rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
            logs[name] = [{k: v for k, v in r.items() if not k.startswith(("perf/", "mem/"))} for r in rows]
    return logs


def losses(tmp: Path) -> dict:
    teachers = {p: str(make_teacher(tmp / p, p, seed=3)) for p in ("tiny-flux", "tiny-sd3")}
    return run_distributed(_runs_body, 2, teachers, str(tmp / "runs"), tp=2)[0]


def environment() -> dict:
    """What decides the float kernels on a CPU: torch's version, the vector extension, and the CPU itself (the same
    AVX512 build rounds differently on an AMD EPYC than on the CPU of the first recording)."""
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": _cpu_model()}


def _cpu_model() -> str:
    import platform

    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return " ".join(filter(None, (fields.get("vendor_id"), fields.get("model name")))) or platform.processor()


def test_losses_equal_the_ones_recorded_before_the_family_move(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    got = losses(tmp_path)
    here = environment()
    same = [r for r in golden["recordings"] if r["environment"] == here]
    exact = bool(same)
    recording = same[0] if same else golden["recordings"][0]
    assert set(got) == set(recording["runs"]) == set(RUNS)
    for name, rows in recording["runs"].items():
        assert len(got[name]) == len(rows), name
        for want, have in zip(rows, got[name]):
            assert set(want) == set(have), (name, sorted(set(want) ^ set(have)))
            for k, v in want.items():
                if exact:
                    assert have[k] == v or (math.isnan(v) and math.isnan(have[k])), \
                        f"{name} step {want['step']} {k}: {have[k]!r} != {v!r} (exact: same environment)"
                else:
                    assert math.isclose(have[k], v, rel_tol=1e-3, abs_tol=1e-7) or (math.isnan(v) and math.isnan(have[k])), \
                        f"{name} step {want['step']} {k}: {have[k]!r} vs {v!r} (1e-3: recorded on {recording['environment']})"


def record() -> None:
    """Adds this environment's recording (replacing one of the same environment): run it on the code before a
    change that may move numbers."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        runs = losses(Path(tmp))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"commit": commit, "recordings": []}
    if golden["commit"] != commit:
        raise SystemExit(f"{GOLDEN} was recorded on {golden['commit']}; record on that commit, or remove the file")
    here = environment()
    golden["recordings"] = [r for r in golden["recordings"] if r["environment"] != here] + [{"environment": here, "runs": runs}]
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    record()
