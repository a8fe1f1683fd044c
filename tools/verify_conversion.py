"""`senseflow verify`: a converted checkpoint against diffusers' model, same random inputs, same outputs.

    senseflow verify --hf DIR --ckpt CKPT [--tp T --pp P]    # starts T x P local processes itself
    torchrun --nproc-per-node N -m megatron_senseflow.tools.verify_conversion --hf DIR --ckpt CKPT --tp T --pp P

Every rank loads its part of CKPT at the asked TP/PP (`load_model`, which
reshards at load) and runs it through megatron's pipeline schedule, as
training does; afterwards rank 0 loads the diffusers transformer from DIR
and runs it on the same inputs. The relative L2 error of every sample is
printed; the last line is `max_rel_err=<value>`. Exit status: 0 within the
tolerance, 1 above it, 2 when the check cannot run (bad paths, TP/PP that do
not fit, architectures that differ).

Tolerances: fp32 1e-4 (the CPU parity tests measure ~1e-6 on tiny models;
deeper models and other GEMM orders add rounding); bf16 5e-2 (tiny random
models measure ~1e-2 against diffusers in bf16, and rounding grows with
depth). Weights of another model give errors near 1, far above either.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

from megatron_senseflow.errors import UserError

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


class VerifyError(UserError):
    """The check cannot run; one sentence naming the value and the fix."""


def random_inputs(arch, batch: int, latent_hw: tuple[int, int], num_txt: int, seed: int, guidance: float | None):
    """diffusers-convention inputs on CPU in fp32, the same on every rank (same seed): the family's own
    (models/family.py reference_inputs). guidance None: a different random scale in [0, 5) per sample (the
    parity tests use that)."""
    from megatron_senseflow.models import family_of

    return family_of(arch).reference_inputs(arch, batch, latent_hw, num_txt, torch.Generator().manual_seed(seed),
                                            guidance)


def sample(arch, batch: dict, i: int, device, dtype) -> dict:
    """Sample i of a batch on `device`; float tensors in `dtype`; what the whole batch shares (position ids,
    image shapes) as it is, and masks as they are (as diffusers keeps them)."""
    from megatron_senseflow.models import family_of

    shared = family_of(arch).per_sample_keys()
    out = {}
    for k, v in batch.items():
        if v is None or k in shared:
            out[k] = v.to(device) if torch.is_tensor(v) else v
        elif v.dtype.is_floating_point:
            out[k] = v[i : i + 1].to(device=device, dtype=dtype)
        else:
            out[k] = v[i : i + 1].to(device=device)
    return out


def check_layout(arch, tp: int, pp: int, world: int) -> None:
    from megatron_senseflow.models.arch_base import LayoutError

    try:
        arch.check_layout(tp, pp, world=world, exact_world=True, names={"tp": "--tp", "pp": "--pp"})
    except LayoutError as e:
        if e.kind != "world":
            raise VerifyError(str(e)) from None
        raise VerifyError(f"--tp {tp} x --pp {pp} needs {tp * pp} processes, but {world} were launched; "
                          f"run `torchrun --nproc-per-node {tp * pp} tools/verify_conversion.py ...`.") from None


def resolve(args, world: int | None = None):
    """Paths and architectures, checked before any process group exists (so errors come once, early)."""
    from megatron_senseflow.models.checkpoint_io import (
        CheckpointError,
        arch_to_dict,
        checkpoint_arch,
    )
    from megatron_senseflow.checkpoint import resolve_role_dir
    from megatron_senseflow.models.configs import arch_of_diffusers_dir
    from megatron_senseflow.tools.hf_io import find_transformer_dir

    src = find_transformer_dir(args.hf)
    arch_hf = arch_of_diffusers_dir(src)
    role_dir = resolve_role_dir(args.ckpt, args.role)
    try:
        arch = checkpoint_arch(role_dir)
    except CheckpointError as e:
        raise VerifyError(str(e)) from None
    a, b = arch_to_dict(arch), arch_to_dict(arch_hf)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        k = diff[0]
        hint = (" (a SenseFlow student has no guidance embedder: verify it against its exported diffusers "
                "directory, or verify the teacher checkpoint against FLUX.1-dev)") if k == "guidance_embeds" else ""
        raise VerifyError(f"{role_dir} holds {a['family']} with {k}={a.get(k)!r} but {src} has {k}={b.get(k)!r}; "
                          f"they are different architectures{hint}.")
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(arch, args.tp, args.pp, world)
    if args.latent_size % 2 or args.latent_size < 2:
        raise VerifyError(f"--latent-size {args.latent_size} must be a positive even number (2x2 patches).")
    return src, role_dir, arch


def run(args) -> int:
    import torch.distributed as dist

    from megatron_senseflow.config import ParallelConfig
    from megatron_senseflow.distributed import destroy_distributed, init_distributed

    from megatron_senseflow.errors import UserError

    try:
        src, role_dir, arch = resolve(args)
        env = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp), seed=args.seed, device=args.device)
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"senseflow verify: {e}", file=sys.stderr)
        return 2

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_senseflow.models import build_model, family_of, transformer_config
    from megatron_senseflow.models.checkpoint_io import load_model, read_meta

    stored = getattr(torch, read_meta(role_dir)["dtype"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype) or (
        stored if env.device.type == "cuda" and stored in TOLERANCE else torch.float32)
    tol = args.tol if args.tol is not None else TOLERANCE[dtype]
    hw = (args.latent_size, args.latent_size)
    family = family_of(arch)
    num_img = family.image_tokens(arch, *hw)
    batch = random_inputs(arch, args.batch, hw, args.text_tokens, args.seed, args.guidance)

    model = build_model(arch, transformer_config(arch, tp=env.tp, pp=env.pp, params_dtype=dtype),
                        tokens=(num_img, args.text_tokens)).to(env.device).eval()
    load_model(model, arch, role_dir)

    outputs: list[torch.Tensor] = []

    def loss_func(out):
        outputs.append(out.detach().float().cpu())
        return out.sum() * 0, {}

    def forward_step(it, m):
        return m(**family.our_inputs(arch, next(it), args.text_tokens)), loss_func

    mbs = [sample(arch, batch, i, env.device, dtype) for i in range(args.batch)]
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(mbs), model=[model], num_microbatches=args.batch,
            seq_length=args.text_tokens + num_img, micro_batch_size=1, forward_only=True,
        )
    mine = torch.cat(outputs) if env.is_last_stage and env.tp_rank == 0 else None
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, mine)
    del model, outputs
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()

    verdict = [0]
    if env.rank == 0:
        ours = next(g for g in gathered if g is not None)
        verdict[0] = compare(args, src, role_dir, arch, batch, ours, dtype, tol, env.device)
    dist.broadcast_object_list(verdict, src=0)
    destroy_distributed()
    return verdict[0]


def compare(args, src, role_dir, arch, batch, ours, dtype, tol, device) -> int:
    import diffusers

    cls = getattr(diffusers, arch.diffusers_class)
    # diffusers may leave some modules in fp32 (seen: SD3 pos_embed.proj); ours holds every weight in `dtype`
    ref = cls.from_pretrained(str(src), torch_dtype=dtype).to(device=device, dtype=dtype).eval()
    errs = []
    with torch.no_grad():
        for i in range(args.batch):
            want = ref(**sample(arch, batch, i, device, dtype), return_dict=False)[0].float().cpu()
            got = ours[i : i + 1]
            errs.append(((got - want).norm() / want.norm().clamp_min(1e-12)).item())
    worst = max(errs)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    print(f"senseflow verify: {src} (diffusers) vs {role_dir} (ours, tp={args.tp} pp={args.pp}), {name}, "
          f"{args.batch} samples of {args.latent_size}x{args.latent_size} latents and {args.text_tokens} text tokens")
    print("relative L2 error per sample: " + ", ".join(f"{e:.3e}" for e in errs))
    if not worst <= tol:  # also catches nan
        print(f"FAIL: max_rel_err {worst:.3e} is above the {name} tolerance {tol:.0e}: the checkpoint does not "
              f"compute what {src} computes (converted from other weights, or a mapping bug).")
    else:
        print(f"OK: within the {name} tolerance {tol:.0e}.")
    print(f"max_rel_err={worst:.6e}", flush=True)
    return 0 if worst <= tol else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="senseflow verify", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf", required=True, help="diffusers pipeline or transformer directory")
    p.add_argument("--ckpt", required=True, help="role checkpoint (or training step directory, with --role)")
    p.add_argument("--role", default="generator", help="role inside a step directory (default: generator)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load the checkpoint at")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load the checkpoint at")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="compute dtype; auto = fp32 on CPU, the checkpoint's dtype on CUDA")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--tol", type=float, help="override the tolerance (fp32 1e-4, bf16 5e-2)")
    p.add_argument("--batch", type=int, default=2, help="samples (run as microbatches of one)")
    p.add_argument("--latent-size", type=int, default=16, help="latent height = width (even)")
    p.add_argument("--text-tokens", type=int, default=16, help="text tokens per sample")
    p.add_argument("--guidance", type=float, default=3.5, help="FLUX.1-dev guidance scale input")
    p.add_argument("--seed", type=int, default=0)


def run_for(verb: str, args) -> int:
    """`senseflow verify`: with TP x PP > 1 outside a launcher, start that many local processes."""
    world = args.tp * args.pp
    if world > 1 and "RANK" not in os.environ:
        from megatron_senseflow.launcher import launch

        resolve(args, world)  # refuse a bad path or layout here, once, before any process starts
        argv = [w for k, v in vars(args).items() if v is not None for w in (f"--{k.replace('_', '-')}", str(v))]
        return launch(world, argv, module="megatron_senseflow.tools.verify_conversion", prog="senseflow verify")
    return run(args)


def main(argv: list[str] | None = None) -> int:
    from megatron_senseflow.train_cli import process_start

    process_start()
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
