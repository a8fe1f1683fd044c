"""Host AdamW step time of the two optimizer CPU-offload backends on the same parameters.

    python scripts/bench_offload.py [--params 200e6] [--repeat 5]

Both backends run megatron-core's HybridDeviceOptimizer; what differs is the
AdamW that updates the offloaded fp32 shard on the host, which is what this
times: torch's fused AdamW ('megatron', megatron-core's own CPUAdam) against
DeepSpeed's compiled DeepSpeedCPUAdam ('deepspeed'), with the arguments megatron
passes, on one DP shard's worth of fp32 parameters split into tensors of
transformer-layer sizes. Prints the ratio last.
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def shard(numel: int, seed: int = 0) -> list[torch.Tensor]:
    """`numel` fp32 parameters in tensors of a FLUX block's sizes (QKV, proj, MLP weights and biases)."""
    pattern = [3072 * 9216, 9216, 3072 * 3072, 3072, 3072 * 12288, 12288, 12288 * 3072, 3072]
    sizes, left = [], numel
    while left > 0:
        sizes.append(min(pattern[len(sizes) % len(pattern)], left))
        left -= sizes[-1]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * 0.02 for s in sizes]


def time_backend(name: str, init: list[torch.Tensor], repeat: int) -> float:
    from megatron_senseflow.roles import _DeepSpeedCPUAdam

    params = [torch.nn.Parameter(t.clone()) for t in init]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    args = dict(lr=1e-5, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    if name == "megatron":
        opt = torch.optim.AdamW(params, fused=True, **args)
    else:
        opt = _DeepSpeedCPUAdam.get()(params, bias_correction=True, fused=True, **args)
    opt.step()  # warm-up: allocates states (and builds the DeepSpeed op on first use)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=200e6, help="fp32 parameters in the shard")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    init = shard(int(a.params))
    n = sum(t.numel() for t in init)
    print(f"{n / 1e6:.0f} M fp32 parameters in {len(init)} tensors, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    t_m = time_backend("megatron", init, a.repeat)
    print(f"megatron  (torch AdamW, fused)   {t_m * 1e3:9.1f} ms/step  {n / t_m / 1e9:6.2f} G params/s")
    t_d = time_backend("deepspeed", init, a.repeat)
    print(f"deepspeed (DeepSpeedCPUAdam)     {t_d * 1e3:9.1f} ms/step  {n / t_d / 1e9:6.2f} G params/s")
    print(f"ratio deepspeed/megatron speed: {t_m / t_d:.2f}x")


if __name__ == "__main__":
    main()
