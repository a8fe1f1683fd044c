"""GPU benchmark: FLUX blocks (ours bf16 / ours FP8 / diffusers eager) and one distillation iteration
(ours vs the authors' way). One command, one process, one table at the end.

    python scripts/bench_gpu.py                 # on one GPU (H100/H200): full FLUX width
    python scripts/bench_gpu.py --dry-run       # CPU, tiny width: checks the script's plumbing only

1. Peak: the best bf16 matmul TFLOP/s of this GPU, measured now (8192^3 and 16384 x 8192 x 8192).
2. Blocks: one FLUX double and one single block at 3072 hidden, 24 heads, 4096 image + 512 text
   tokens, batch 1 and 2, forward only: ours (TE spec, bf16), ours (TE spec, FP8 through
   megatron-core's fp8_utils, --fp8-recipe), diffusers' FluxTransformerBlock /
   FluxSingleTransformerBlock in bf16 eager. TFLOP/s from models.flops, and the fraction of (1).
3. Iteration: DMD generator step + fake-score step at FLUX width with --blocks double/single
   blocks (fits one GPU), batch 1: ours (`Trainer.train_step`, method dmd2 without the
   discriminator, no backward simulation, TTUR 1) against the same work done the authors' way
   (diffusers modules, bf16 autocast over fp32 weights, torch FSDP wrapping every block, AdamW).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------- timing


def timed(fn, warmup: int, iters: int, device: torch.device) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def matmul_peak(device, dtype, dry: bool) -> float:
    shapes = [(256, 256, 256)] if dry else [(8192, 8192, 8192), (16384, 8192, 8192)]
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        t = timed(lambda: a @ b, 3, 10, device)
        best = max(best, 2 * m * k * n / t / 1e12)
    return best


# --------------------------------------------------------------------------- blocks


def flux_width(dry: bool) -> dict:
    if dry:
        return dict(in_channels=16, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                    pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    return dict(in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))


def our_blocks(spec: str, fp8: str | None, recipe: str, dry: bool):
    """(double block, single block, rope, config) of a 1+1-block FLUX at full width."""
    from megatron_senseflow.models import build_model, transformer_config
    from megatron_senseflow.models.configs import make_arch

    arch = make_arch("tiny-flux", {**flux_width(dry), "num_layers": 1, "num_single_layers": 1, "guidance_embeds": False})
    cfg = transformer_config(arch, params_dtype=torch.bfloat16, fp8=fp8, fp8_recipe=recipe)
    model = build_model(arch, cfg, spec=spec)
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return model.to(dev).eval(), arch, cfg


def _backward(out):
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward([o for o in outs if o is not None], [torch.ones_like(o) for o in outs if o is not None])


def bench_blocks(args, device, peak) -> list[dict]:
    from megatron_senseflow.models.costs import flux_single_block, mmdit_block
    from megatron_senseflow.models.flux.model import image_ids, text_ids
    from megatron_senseflow.models.layers import fp8_context

    s_img, s_txt = (64, 16) if args.dry_run else (4096, 512)
    rows = []
    variants = [("ours bf16", args.spec, None)]
    if args.spec == "te":
        variants.append((f"ours fp8 ({args.fp8_recipe})", "te", "hybrid"))
    for label, spec, fp8 in variants:
        model, arch, cfg = our_blocks(spec, fp8, args.fp8_recipe, args.dry_run)
        h = arch.hidden_size
        side = int(s_img ** 0.5) * 2
        rope = model.rope(torch.cat([text_ids(s_txt, device), image_ids(side, side, device)]))
        for b in (1, 2):
            img = torch.randn(s_img, b, h, device=device, dtype=torch.bfloat16)
            txt = torch.randn(s_txt, b, h, device=device, dtype=torch.bfloat16)
            x = torch.cat([txt, img])
            c = torch.randn(b, h, device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                def dbl():
                    with fp8_context(cfg):
                        return model.double_blocks[0](img, txt, c, rope)

                def sgl():
                    with fp8_context(cfg):
                        return model.single_blocks[0](x, c, rope)

                for kind, fn, flops in (("double", dbl, mmdit_block(b, s_img, s_txt, h)),
                                        ("single", sgl, flux_single_block(b, s_img + s_txt, h))):
                    t = timed(fn, 3, args.iters, device)
                    rows.append(dict(block=kind, batch=b, impl=label, ms=t * 1e3, tflops=flops / t / 1e12,
                                     of_peak=flops / t / 1e12 / peak))
            if fp8 is None:  # forward + backward (3x the forward's FLOPs), bf16 only
                for kind, run, flops in (("double", lambda: model.double_blocks[0](img, txt, c, rope), mmdit_block(b, s_img, s_txt, h)),
                                         ("single", lambda: model.single_blocks[0](x, c, rope), flux_single_block(b, s_img + s_txt, h))):
                    t = timed(lambda run=run: _backward(run()), 3, args.iters, device)
                    rows.append(dict(block=kind, batch=b, impl=label + " fwd+bwd", ms=t * 1e3,
                                     tflops=3 * flops / t / 1e12, of_peak=3 * flops / t / 1e12 / peak))
    rows += diffusers_blocks(args, device, peak, s_img, s_txt)
    return rows


def diffusers_blocks(args, device, peak, s_img, s_txt) -> list[dict]:
    from diffusers.models.embeddings import FluxPosEmbed
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    from megatron_senseflow.models.costs import flux_single_block, mmdit_block
    from megatron_senseflow.models.flux.model import image_ids, text_ids

    w = flux_width(args.dry_run)
    heads, d = w["num_attention_heads"], w["attention_head_dim"]
    h = heads * d
    dbl = FluxTransformerBlock(h, heads, d).to(device, torch.bfloat16).eval()
    sgl = FluxSingleTransformerBlock(h, heads, d).to(device, torch.bfloat16).eval()
    side = int(s_img ** 0.5) * 2
    ids = torch.cat([text_ids(s_txt, device), image_ids(side, side, device)]).float()
    rope = FluxPosEmbed(theta=10000, axes_dim=list(w["axes_dims_rope"]))(ids)
    rows = []
    for b in (1, 2):
        img = torch.randn(b, s_img, h, device=device, dtype=torch.bfloat16)
        txt = torch.randn(b, s_txt, h, device=device, dtype=torch.bfloat16)
        temb = torch.randn(b, h, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            for kind, fn, flops in (
                ("double", lambda: dbl(img, txt, temb, rope), mmdit_block(b, s_img, s_txt, h)),
                ("single", lambda: sgl(img, txt, temb, rope), flux_single_block(b, s_img + s_txt, h)),
            ):
                t = timed(fn, 3, args.iters, device)
                rows.append(dict(block=kind, batch=b, impl="diffusers bf16 eager", ms=t * 1e3,
                                 tflops=flops / t / 1e12, of_peak=flops / t / 1e12 / peak))
    return rows


# --------------------------------------------------------------------------- one iteration


def iteration_arch(args) -> dict:
    return {**flux_width(args.dry_run), "num_layers": args.blocks, "num_single_layers": 2 * args.blocks,
            "guidance_embeds": True}


def ours_iteration(args, device, out_dir: Path) -> tuple[float, float]:
    """(seconds per iteration, model FLOPs per iteration) of our trainer, dmd2 without D, TTUR 1."""
    from megatron_senseflow.config import load_config
    from megatron_senseflow.distributed import current_env
    from megatron_senseflow.trainer import Trainer

    res = 32 if args.dry_run else 1024
    prec = "bf16"
    overrides = [
        "method=dmd2", "roles.discriminator.enabled=false", "distill.ttur=1", "distill.backward_sim_prob=0",
        "distill.guidance_mode=embedding", f"model.spec={args.spec}", "model.params_dtype=bfloat16",
        f"roles.generator.precision={prec}", f"roles.fake_score.precision={'fp8' if args.fp8_fake else prec}",
        f"roles.teacher.precision={'fp8' if args.fp8_teacher else prec}", f"model.fp8_recipe={args.fp8_recipe}",
        f"data.resolution={res}", "data.micro_batch_size=1", f"data.text_max_length={16 if args.dry_run else 512}",
        f"train.output_dir={out_dir}", f"train.device={device.type}", "logging.tensorboard=false",
        "logging.log_every=0", "logging.image_every=0", "checkpoint.every=0", f"model.recompute={args.recompute}",
    ]
    cfg = load_config("tiny", overrides)
    cfg.model.arch = iteration_arch(args)
    cfg.roles.discriminator.vae = "pixel"
    tr = Trainer(cfg, current_env(device))
    it = iter(tr.data)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = timed(lambda: tr.train_step(next(it)), 2, args.iters, device)
    f = tr._flops
    # generator: forward + backward (3 forwards); teacher and fake: one forward each; fake step: 3 forwards
    flops = 3 * f["generator"] + f["teacher"] + f["fake_score"] + 3 * f["fake_score"]
    from megatron_senseflow.memory_plan import GB, plan

    pl = plan(cfg, 1, 1, 141)
    args.memory = dict(peak_allocated_gb=torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None,
                       plan_static_gb=sum(r.static for r in pl.roles) / GB, plan_activations_gb=pl.peak_activations / GB,
                       plan_total_without_runtime_gb=(sum(r.static for r in pl.roles) + pl.peak_activations) / GB)
    return t, flops


def authors_iteration(args, device) -> float:
    """The same DMD + fake-score work with diffusers modules, bf16 autocast and FSDP on every block."""
    from diffusers import FluxTransformer2DModel
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from megatron_senseflow import flow
    from megatron_senseflow.models.flux.model import image_ids, pack_latents, text_ids, unpack_latents

    a = iteration_arch(args)
    kw = dict(in_channels=a["in_channels"], num_layers=a["num_layers"], num_single_layers=a["num_single_layers"],
              attention_head_dim=a["attention_head_dim"], num_attention_heads=a["num_attention_heads"],
              joint_attention_dim=a["joint_attention_dim"], pooled_projection_dim=a["pooled_projection_dim"],
              axes_dims_rope=list(a["axes_dims_rope"]))
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    policy = ModuleWrapPolicy({FluxTransformerBlock, FluxSingleTransformerBlock})
    fsdp_kw = dict(auto_wrap_policy=policy, use_orig_params=True)
    if device.type == "cuda":
        fsdp_kw["device_id"] = device

    def wrap(m):
        # FSDP1 needs an accelerator; the CPU dry run checks the rest of the loop unwrapped
        return FSDP(m.to(device), **fsdp_kw) if device.type == "cuda" else m.to(device)

    teacher = wrap(FluxTransformer2DModel(**kw, guidance_embeds=True)).requires_grad_(False)
    gen = wrap(FluxTransformer2DModel(**kw, guidance_embeds=False))
    fake = wrap(FluxTransformer2DModel(**kw, guidance_embeds=False))

    def clip(m):
        if hasattr(m, "clip_grad_norm_"):
            m.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)

    opt_g = torch.optim.AdamW(gen.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0)
    opt_f = torch.optim.AdamW(fake.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0)
    side = 4 if args.dry_run else 128  # latent side; packed 2x2 -> 4096 tokens at 1024 px
    s_txt = 16 if args.dry_run else 512
    c_lat = a["in_channels"] // 4
    img_ids, txt_ids = image_ids(side, side, device), text_ids(s_txt, device)
    from megatron_senseflow.models.configs import make_arch

    taus = flow.anchors(4, flow.default_shift(make_arch("flux-student"), (side // 2) ** 2, 4))
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def velocity(model, x, sigma, text, pooled, guidance=None):
        out = model(hidden_states=pack_latents(x), encoder_hidden_states=text, pooled_projections=pooled,
                    timestep=sigma, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        return unpack_latents(out, side, side).float()

    def step():
        x0 = torch.randn(1, c_lat, side, side, device=device)
        text = torch.randn(1, s_txt, a["joint_attention_dim"], device=device)
        pooled = torch.randn(1, a["pooled_projection_dim"], device=device)
        tau = torch.tensor([taus[1]], device=device)
        x_tau = flow.noise(x0, torch.randn_like(x0), tau)
        with autocast:
            x0_hat = flow.x0_from_v(x_tau, tau, velocity(gen, x_tau, tau, text, pooled))
            t = torch.sigmoid(torch.randn(1, device=device))
            x_t = flow.noise(x0_hat.detach(), torch.randn_like(x0), t)
            with torch.no_grad():
                g = torch.empty(1, device=device).uniform_(1, 8)
                real = flow.x0_from_v(x_t, t, velocity(teacher, x_t, t, text, pooled, g))
                fake_x0 = flow.x0_from_v(x_t, t, velocity(fake, x_t, t, text, pooled))
        p_real = x0_hat.detach() - real
        grad = (p_real - (x0_hat.detach() - fake_x0)) / p_real.abs().mean().clamp_min(1e-8)
        loss = 0.5 * torch.nn.functional.mse_loss(x0_hat, (x0_hat - grad).detach())
        loss.backward()
        clip(gen)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        eps = torch.randn_like(x0)
        t2 = torch.sigmoid(torch.randn(1, device=device))
        with autocast:
            v = velocity(fake, flow.noise(x0_hat.detach(), eps, t2), t2, text, pooled)
        loss_f = torch.nn.functional.mse_loss(v, eps - x0_hat.detach())
        loss_f.backward()
        clip(fake)
        opt_f.step()
        opt_f.zero_grad(set_to_none=True)

    t = timed(step, 2, args.iters, device)
    return t


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny width: check the plumbing, not the speed")
    ap.add_argument("--spec", default=None, help="layer spec (default: te on GPU, local in --dry-run)")
    ap.add_argument("--fp8-recipe", default="tensorwise", help="delayed, tensorwise, blockwise or mxfp8")
    ap.add_argument("--blocks", type=int, default=2, help="double blocks in the iteration benchmark (single = 2x)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--recompute", default="none")
    ap.add_argument("--fp8-fake", action="store_true", help="fake score in FP8 in our iteration")
    ap.add_argument("--fp8-teacher", action="store_true", help="teacher in FP8 in our iteration")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: blocks, iteration")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    args.spec = args.spec or ("local" if args.dry_run else "te")
    skip = set(filter(None, args.skip.split(",")))

    from megatron_senseflow.config import ParallelConfig
    from megatron_senseflow.distributed import init_distributed

    env = init_distributed(ParallelConfig(), device="cpu" if args.dry_run else "cuda")
    device = env.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    peak = matmul_peak(device, torch.bfloat16, args.dry_run)
    print(f"device: {name}; measured bf16 matmul peak {peak:.1f} TFLOP/s", flush=True)
    out: dict = {"device": name, "peak_bf16_tflops": peak}
    if "blocks" not in skip:
        out["blocks"] = bench_blocks(args, device, peak)
    if "iteration" not in skip:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            t_ours, flops = ours_iteration(args, device, Path(tmp))
        t_ref = authors_iteration(args, device)
        out["iteration"] = dict(ours_s=t_ours, authors_s=t_ref, speedup=t_ref / t_ours,
                                ours_mfu=flops / t_ours / 1e12 / peak, authors_mfu=flops / t_ref / 1e12 / peak,
                                blocks=f"{args.blocks} double + {2 * args.blocks} single", memory=args.memory)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))

    print()
    if "blocks" in out:
        print(f"{'block':<8}{'batch':>6}  {'implementation':<28}{'ms':>9}{'TFLOP/s':>10}{'of peak':>9}")
        for r in out["blocks"]:
            print(f"{r['block']:<8}{r['batch']:>6}  {r['impl']:<28}{r['ms']:>9.2f}{r['tflops']:>10.1f}{r['of_peak']:>9.1%}")
    if "iteration" in out:
        it = out["iteration"]
        print(f"\niteration ({it['blocks']} blocks at FLUX width, batch 1): ours {1 / it['ours_s']:.2f} samples/s "
              f"(MFU {it['ours_mfu']:.1%}), authors' way {1 / it['authors_s']:.2f} samples/s "
              f"(MFU {it['authors_mfu']:.1%}); ratio {it['speedup']:.2f}x")
        m = it["memory"]
        if m["peak_allocated_gb"] is not None:
            print(f"peak allocated {m['peak_allocated_gb']:.2f} GB; plan (static + activations, no runtime/slack) "
                  f"{m['plan_total_without_runtime_gb']:.2f} GB; ratio {m['peak_allocated_gb'] / m['plan_total_without_runtime_gb']:.3f}")


if __name__ == "__main__":
    main()
