"""Forward+backward time of our local-spec DiTs against diffusers eager, same weights, same inputs, one run.

    python scripts/bench_models.py [--iters 10] [--dtype float32|bfloat16]

Prints one line per model with both medians and the ratio diffusers/ours
(> 1 means ours is faster). CPU by default; on a GPU it runs there.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()

    import diffusers

    from megatron_senseflow.config import ParallelConfig
    from megatron_senseflow.distributed import init_distributed
    from megatron_senseflow.models import build_model, family_of, hf_mapping, transformer_config
    from megatron_senseflow.models.configs import arch_to_diffusers_config, make_arch

    env = init_distributed(ParallelConfig())
    if env.device.type == "cpu":
        from megatron_senseflow.cpu_megatron import suspended
    else:
        from contextlib import nullcontext as suspended
    dtype = getattr(torch, args.dtype)
    dev = env.device
    cases = {
        "flux (3 double + 6 single, h=384, 256+64 tokens)": (
            make_arch("tiny-flux", dict(num_layers=3, num_single_layers=6, num_attention_heads=6,
                                         attention_head_dim=64, joint_attention_dim=256, pooled_projection_dim=128,
                                         axes_dims_rope=(16, 24, 24))),
        ),
        "sd3.5-medium-like (6 blocks, 3 dual, h=384, 256+64 tokens)": (
            make_arch("tiny-sd3", dict(num_layers=6, num_attention_heads=6, attention_head_dim=64,
                                        caption_projection_dim=384, joint_attention_dim=256, pooled_projection_dim=128,
                                        in_channels=16, out_channels=16, sample_size=32, pos_embed_max_size=32,
                                        dual_attention_layers=(0, 1, 2))),
        ),
    }
    b, ntxt, lat = args.batch, 64, 32
    print(f"device={dev.type} dtype={args.dtype} batch={b} iters={args.iters} threads={torch.get_num_threads()}")
    for name, (arch,) in cases.items():
        cls = getattr(diffusers, arch.diffusers_class)
        fam = family_of(arch)
        torch.manual_seed(0)
        ref = cls(**{k: v for k, v in arch_to_diffusers_config(arch).items() if k != "_class_name"}).to(dev, dtype)
        ours = build_model(arch, transformer_config(arch, params_dtype=dtype)).to(dev)
        sd = ref.state_dict()
        ours.local_from_canonical(dict(hf_mapping.hf_to_ours(arch, sd.__getitem__)))
        ref_kw = fam.reference_inputs(arch, b, (lat, lat), ntxt, torch.Generator().manual_seed(1), 3.5)
        ref_kw = {k: (v.to(dev, dtype) if torch.is_tensor(v) and v.dtype.is_floating_point
                      and k not in fam.per_sample_keys() else v.to(dev) if torch.is_tensor(v) else v)
                  for k, v in ref_kw.items()}
        kw = fam.our_inputs(arch, ref_kw, ntxt)

        def step_ref():
            # diffusers runs as plain torch: outside the CPU harness's function mode
            with suspended():
                ref.zero_grad(set_to_none=True)
                ref(**ref_kw).sample.float().square().mean().backward()

        def step_ours():
            ours.zero_grad(set_to_none=True)
            ours(**kw).float().square().mean().backward()

        with torch.no_grad():
            want = ref(**ref_kw).sample.float()
            err = (ours(**kw).float() - want).norm() / want.norm()
        t_ref, t_ours = _time(step_ref, args.iters), _time(step_ours, args.iters)
        print(f"{name}: diffusers {t_ref * 1e3:.1f} ms, ours {t_ours * 1e3:.1f} ms, "
              f"ratio diffusers/ours = {t_ref / t_ours:.2f} (output rel err {err:.1e})")


if __name__ == "__main__":
    main()
