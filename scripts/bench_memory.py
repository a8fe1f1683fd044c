"""Activation memory of the trainable DiT roles: measured (saved-tensor hooks) against `senseflow memory-plan`.

    python scripts/bench_memory.py            # FLUX.1-dev TP4, SD3.5 Large TP2, SD3.5 Medium TP1, Qwen-Image and
                                              # FLUX.2-dev TP8, 1024 px

For each recipe and recompute setting, one generator forward at full depth and
width is run on the meta device in TP gloo ranks (megatron_senseflow.memory_probe:
no memory, no arithmetic) and the bytes autograd keeps for backward are counted
per rank. Under full recompute the backward also holds one block being
recomputed: the largest block's measured bytes (two depths' difference) are
added. The plan's figure for the same layout (PP=1) is printed next to it with
the ratio measured / plan. The fake score runs the same architecture on the same
inputs, so it holds the same bytes; the frozen teacher keeps nothing for
backward (its working set is one block at a time, the plan's teacher column).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

CASES = [("flux_dev", 4), ("sd35_large", 2), ("sd35_medium", 1), ("qwen_image", 8), ("flux2_dev", 8)]


def _measure(env, preset: str, depth: tuple[int, int, int], tp: int, recompute: str, text_tokens: int) -> dict:
    from megatron_senseflow.memory_probe import saved_for_backward as probe

    d, s, dual = depth
    full = probe(preset, d, s, tp, recompute, text_tokens=text_tokens, dual=dual).saved
    # one block of each kind, for the block being recomputed under full recompute
    flux = s > 0
    base = probe(preset, 1, 1 if flux else 0, tp, "none", text_tokens=text_tokens, dual=min(dual, 1)).saved
    blocks = [probe(preset, 2, 1 if flux else 0, tp, "none", text_tokens=text_tokens, dual=min(dual, 2)).saved - base]
    if flux:
        blocks.append(probe(preset, 1, 2, tp, "none", text_tokens=text_tokens).saved - base)
    return {"forward": full, "largest_block": max(blocks)}


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron_senseflow.config import load_config
    from megatron_senseflow.memory_plan import GB, plan
    from tests.dist_helpers import run_distributed

    print(f"{'recipe':<12}{'tp':>3}  {'recompute':<9}{'measured':>10}{'plan':>9}{'measured/plan':>15}")
    t0 = time.time()
    for recipe, tp in CASES:
        for recompute in ("full", "none"):
            cfg = load_config(recipe, [f"parallel.tp={tp}", "parallel.pp=1", f"model.recompute={recompute}"])
            arch = cfg.model.student_arch()
            from megatron_senseflow.models import family_of

            depth = family_of(arch).block_counts(arch)
            got = run_distributed(_measure, tp, cfg.model.preset, depth, tp, recompute, cfg.data.text_max_length, tp=tp)[0]
            measured = got["forward"] + (got["largest_block"] if recompute == "full" else 0)
            planned = {r.name: r for r in plan(cfg, 1, tp, 80).roles}["generator"].activations
            print(f"{recipe:<12}{tp:>3}  {recompute:<9}{measured / GB:>8.2f} GB{planned / GB:>6.2f} GB"
                  f"{measured / planned:>14.3f}x", flush=True)
    print(f"(generator = fake score per GPU, batch 1, bf16, 1024 px; {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
