"""`senseflow sample`: 1/2/4-step sampling of a distilled student (or many-step teacher sampling).

    senseflow sample --ckpt RUN --prompts prompts.txt --out samples/ --text-encoder /models/FLUX.1-dev
    senseflow sample --diffusers student-diffusers/ --prompts p.txt --out s/ --steps 2 --sampler euler ...
    senseflow sample --ckpt demo_out/run --prompts p.txt --out s/ --text-encoder demo   # the digits demo

--ckpt takes a role checkpoint, a training step directory or a training output
directory (its latest complete step); --diffusers an exported transformer or
pipeline directory. Text: a diffusers pipeline directory (its text encoders) or
`demo`. Images: --vae (a pipeline or VAE directory), or `pixel` for pixel-space
models. One PNG per prompt and sample; under torchrun the model runs at --tp/--pp.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="Megatron checkpoint: role dir, step dir or training output dir")
    src.add_argument("--diffusers", help="exported diffusers transformer or pipeline directory")
    p.add_argument("--role", default="generator", help="role to sample from a step directory (generator, ema, ...)")
    p.add_argument("--base", default=None, help="a LoRA run's base checkpoint (default: the one its adapters record)")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="output folder for PNGs")
    p.add_argument("--text-encoder", required=True, help="diffusers pipeline directory with the text encoders, or 'demo'")
    p.add_argument("--vae", default=None, help="pipeline or VAE directory; 'pixel' for pixel-space models (default: --text-encoder's vae/)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (1, 2, 4 for a student; many for a teacher; default: the training run's, else 4)")
    p.add_argument("--sampler", default="stochastic", choices=["stochastic", "euler"])
    p.add_argument("--resolution", type=int, default=None,
                   help="pixels per side (default: the training run's data.resolution, else 1024)")
    p.add_argument("--shift", type=float, default=None, help="timestep shift (default: the training run's anchors, "
                   "else the family's)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (teachers; 1 = off)")
    p.add_argument("--guidance", type=float, default=None, help="guidance embedding value for models that embed it "
                   "(default: the training run's student guidance, else 3.5 as FLUX.1-dev)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-prompt", type=int, default=1, help="samples per prompt")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)


def load_text_encoder(spec: str, family: str, text_len: int | None):
    if spec == "demo":
        from .demo import digits_text

        return digits_text()
    from megatron_senseflow.data.encode import text_encoder

    return text_encoder(spec, family, text_len)


def load_codec(vae: str | None, text_encoder: str, arch):
    from .codec import build_codec

    if vae is None:
        vae = "pixel" if text_encoder == "demo" else str(Path(text_encoder) / "vae")
    elif vae != "pixel" and (Path(vae) / "vae").is_dir():
        vae = str(Path(vae) / "vae")
    return build_codec(vae, arch)


def load_model(args, tp: int, pp: int):
    """(module, arch) at this rank's layout from a Megatron checkpoint or an exported diffusers directory."""
    from megatron_senseflow.models import build_model, hf_mapping, transformer_config
    from megatron_senseflow.models.checkpoint_io import checkpoint_arch
    from megatron_senseflow.models.checkpoint_io import load_trained

    if args.ckpt:
        from megatron_senseflow.checkpoint import resolve_role_dir

        role_dir = resolve_role_dir(args.ckpt, args.role)
        arch = checkpoint_arch(role_dir)
        step = role_dir.parent.name if role_dir.parent.name.startswith("step_") else None
        if int(__import__("os").environ.get("RANK", "0")) == 0:
            print(f"sampling the {role_dir.name} of {step or 'a role checkpoint'} ({role_dir})", flush=True)
        module = build_model(arch, transformer_config(arch, tp=tp, pp=pp))
        load_trained(module, arch, role_dir, args.base)
    else:
        from megatron_senseflow.models.configs import arch_of_diffusers_dir
        from megatron_senseflow.tools.hf_io import SafetensorsDir, find_transformer_dir

        tdir = find_transformer_dir(args.diffusers)
        arch = arch_of_diffusers_dir(tdir)
        module = build_model(arch, transformer_config(arch, tp=tp, pp=pp))
        src = SafetensorsDir(tdir)
        module.local_from_canonical(dict(hf_mapping.hf_to_ours(arch, src.get)), strict=True)
    return module.eval(), arch


def run(args: argparse.Namespace) -> int:
    from . import flow, progress
    from .config import ConfigError, ParallelConfig
    from .distributed import destroy_distributed, init_distributed
    from .roles import Role
    from .sampling import guided, sample_euler, sample_student
    from megatron_senseflow.models.flops import image_tokens

    prompts = [ln.strip() for ln in Path(args.prompts).read_text().splitlines() if ln.strip()]
    if not prompts:
        raise ConfigError(f"{args.prompts} holds no prompts (one per line).")
    env = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp))
    try:
        module, arch = load_model(args, args.tp, args.pp)
        role = Role("sampler", arch, module)
        channels = arch.latent_channels
        codec = load_codec(args.vae, args.text_encoder, arch).to(env.device)
        run_cfg = training_config(args.ckpt) if args.ckpt else None
        d = run_cfg.distill if run_cfg is not None else None
        steps = args.steps or (d.num_steps if d else 4)
        resolution = args.resolution or (run_cfg.data.resolution if run_cfg else 1024)
        guidance = args.guidance if args.guidance is not None else (d.student_guidance if d else 3.5)
        text = load_text_encoder(args.text_encoder, arch.family, run_cfg.data.text_max_length if run_cfg else None)
        side = resolution // codec.factor
        tokens = image_tokens(arch, side, side)
        m = args.shift or (d.shift if d else None) or flow.default_shift(arch, tokens, steps)
        if d is not None and steps == d.num_steps and args.shift is None:  # the anchors the student trained at
            taus = flow.student_anchors(steps, d.shift, arch, tokens, d.anchor_rounding)
        else:
            taus = flow.anchors(steps, m)
        out = Path(args.out)
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
        jobs = [(i, k) for i in range(len(prompts)) for k in range(args.per_prompt)]
        gen = torch.Generator().manual_seed(args.seed)
        bar = progress.bar(total=len(jobs), desc="sample", unit="img", main=env.is_main)
        for start in range(0, len(jobs), args.batch):
            chunk = jobs[start : start + args.batch]
            c, p = (t.to(env.device) for t in text.encode([prompts[i] for i, _ in chunk]))
            g_val = torch.full((len(chunk),), guidance, device=env.device) if arch.guidance_embeds else None
            noise = torch.randn(len(chunk), channels, side, side, generator=gen).to(env.device)

            def vel(cc, pp):
                return lambda x, s: role.forward(x, s, cc, pp, g_val)

            v = vel(c, p)
            if args.cfg != 1.0:
                ec, ep = (t.to(env.device) for t in text.encode([""] * len(chunk)))
                v = guided(v, vel(ec, ep), args.cfg)
            if steps <= 4:
                x0 = sample_student(v, noise, taus, args.sampler, gen)
            else:
                x0 = sample_euler(v, noise, flow.teacher_sigmas(steps, m))
            images = codec.decode(x0.float()).clamp(-1, 1)
            if env.is_main:
                for (i, k), img in zip(chunk, images):
                    save_png(img, out / f"{i:05d}_{k:02d}.png")
            bar.update(len(chunk))
        bar.close()
        if env.is_main:
            (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
            print(f"wrote {len(jobs)} images of {resolution} px ({steps} {args.sampler if steps <= 4 else 'euler'} "
                  f"steps) to {out}")
        return 0
    finally:
        destroy_distributed()


def training_config(ckpt: str):
    """The resolved config of the training run a --ckpt path belongs to (its step's or output's
    config.yaml), or None for a role checkpoint outside a run."""
    from .checkpoint import CheckpointManager
    from .config import ConfigError, load_config

    p = Path(ckpt)
    latest = CheckpointManager(p / "checkpoints").latest() if p.is_dir() else None
    for cand in (p / "config.yaml", p.parent / "config.yaml", *([latest / "config.yaml"] if latest else [])):
        if cand.is_file():
            try:
                return load_config(str(cand))
            except ConfigError:
                return None  # a config this version cannot read: fall back to the flags' defaults
    return None


def save_png(img_CHW: torch.Tensor, path: Path) -> None:
    from PIL import Image

    arr = ((img_CHW.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).byte()
    arr = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(path)
