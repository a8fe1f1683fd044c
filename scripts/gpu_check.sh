#!/usr/bin/env bash
# The prepared device check: one call on a lent GPU machine (one H200, torch + CUDA, no network).
#
#   bash scripts/gpu_check.sh             # on the GPU machine; results in $OUT (gpu_check.json, gpu_check.md)
#   bash scripts/gpu_check.sh --dry-run   # on CPU: the same plumbing at tiny width (the test suite runs it)
#
# Wheels travel with the working tree in .whl/ (git-ignored; made here, before the device call, by
#   .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d .whl megatron-core==0.16.1 diffusers==0.42.1 webdataset braceexpand
# 8.7 MB of the 64 MiB allowed; everything else the package imports is in the machine's image, whose torch
# stays). TransformerEngine cannot travel (a 276 MB wheel and a torch extension built from source), so only
# the `local` layer spec runs there: no FP8 rows, no TE tests.
#
# Steps, each bounded (60 + 330 + 120 s) so that the whole stays inside the 540 s device call:
#   1. install the wheels (no index, no deps) and this checkout (PYTHONPATH, no build)
#   2. scripts/bench_gpu.py --spec local: bf16 matmul peak; FLUX double and single block at full width,
#      forward and forward+backward, ours against diffusers' blocks; one reduced-depth trainer iteration
#      on CUDA (megatron_senseflow.cpu_megatron is never imported there) with its peak memory against
#      `senseflow memory-plan`'s figures for the same configuration
#   3. the GPU tests that need no TransformerEngine (tests/test_gpu.py -m gpu -k without_cpu_support_code)
set -uo pipefail
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ -x "$REPO/.venv/bin/python" ] && [ "$DRY" = 1 ] && PY=$REPO/.venv/bin/python
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$OUT/gpu_check.log"; }

status_install=skipped
if [ -d "$REPO/.whl" ] && [ "$DRY" = 0 ]; then
    log "installing $(ls "$REPO"/.whl/*.whl | wc -l) wheels from .whl/"
    if timeout 60 "$PY" -m pip install --quiet --no-index --no-deps "$REPO"/.whl/*.whl >>"$OUT/gpu_check.log" 2>&1; then
        status_install=ok
    else
        status_install=failed
    fi
fi

bench_args=(--spec local --json "$OUT/bench_gpu.json" --iters 10)
[ "$DRY" = 1 ] && bench_args=(--dry-run --json "$OUT/bench_gpu.json" --iters 1)
log "bench_gpu.py ${bench_args[*]}"
timeout 330 "$PY" "$REPO/scripts/bench_gpu.py" "${bench_args[@]}" >"$OUT/bench_gpu.txt" 2>&1
status_bench=$?

log "GPU tests without TransformerEngine"
timeout 120 "$PY" -m pytest -q -m gpu "$REPO/tests/test_gpu.py" -k without_cpu_support_code -p no:cacheprovider \
    >"$OUT/gpu_tests.txt" 2>&1
status_tests=$?
[ "$status_tests" = 5 ] && status_tests=0  # no test collected

"$PY" - "$OUT" "$status_install" "$status_bench" "$status_tests" "$DRY" <<'PYEOF'
import json, sys
from pathlib import Path
out, inst, bench, tests, dry = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
res = {"dry_run": dry, "install": inst, "bench_exit": bench, "tests_exit": tests}
p = out / "bench_gpu.json"
res["bench"] = json.loads(p.read_text()) if p.exists() else None
t = (out / "gpu_tests.txt").read_text(errors="replace").strip().splitlines()
res["tests_summary"] = t[-1] if t else ""
(out / "gpu_check.json").write_text(json.dumps(res, indent=1))
b = res["bench"] or {}
lines = [f"# device check ({'dry run on CPU: numbers mean nothing' if dry else b.get('device', '?')})", "",
         f"wheels: {inst}; bench exit {bench}; GPU tests: {res['tests_summary'] or 'none'} (exit {tests})", "",
         f"bf16 matmul peak: {b.get('peak_bf16_tflops', float('nan')):.1f} TFLOP/s", "",
         "| block | batch | implementation | ms | TFLOP/s | of peak |", "|---|---|---|---|---|---|"]
for r in b.get("blocks", []):
    lines.append(f"| {r['block']} | {r['batch']} | {r['impl']} | {r['ms']:.2f} | {r['tflops']:.1f} | {r['of_peak']:.1%} |")
it = b.get("iteration")
if it:
    lines += ["", f"iteration ({it['blocks']}): ours {1 / it['ours_s']:.2f} samples/s, authors' way "
              f"{1 / it['authors_s']:.2f} samples/s, ratio {it['speedup']:.2f}x"]
    m = it.get("memory") or {}
    if m.get("peak_allocated_gb") is not None:
        lines.append(f"peak allocated {m['peak_allocated_gb']:.2f} GB vs plan {m['plan_total_without_runtime_gb']:.2f} GB "
                     f"(static {m['plan_static_gb']:.2f} + activations {m['plan_activations_gb']:.2f})")
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if bench == 0 and tests == 0 and inst != "failed" else 1)
PYEOF
