"""scripts/gpu_check.sh --dry-run: the prepared device check's plumbing, on CPU (its numbers mean nothing)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_json_and_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["dry_run"] is True and res["bench_exit"] == 0 and res["tests_exit"] == 0
    bench = res["bench"]
    assert bench["peak_bf16_tflops"] > 0
    impls = {(b["block"], b["impl"]) for b in bench["blocks"]}
    for kind in ("double", "single"):  # ours forward, ours forward+backward, diffusers, for both blocks
        assert {(kind, "ours bf16"), (kind, "ours bf16 fwd+bwd"), (kind, "diffusers bf16 eager")} <= impls
    it = bench["iteration"]
    assert it["ours_s"] > 0 and it["authors_s"] > 0
    assert it["memory"]["plan_total_without_runtime_gb"] > 0  # the plan's figure the GPU peak is compared with
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| double | 1 | ours bf16 fwd+bwd |" in table and "dry run on CPU" in table
    # the GPU tests that need no TransformerEngine were selected (and skip here: no CUDA)
    assert "1 skipped" in res["tests_summary"], res["tests_summary"]
