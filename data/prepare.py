"""`senseflow prepare-data`: write webdataset shards from a source, or (--encode) add latents and text embeddings.

    senseflow prepare-data --input laion/ --format img2dataset --out shards/ --resolution 1024
    torchrun --nproc-per-node 8 -m megatron_senseflow.cli prepare-data --encode \\
        --input shards/ --out encoded/ --model-path /models/FLUX.1-dev --family flux

Both steps resume: rerunning the same command after a crash finishes the
missing shards and writes nothing twice (see `data.shards`).
"""
from __future__ import annotations

import argparse
import logging
import os
import re

import torch

from megatron_senseflow.config import ConfigError

from megatron_senseflow.models import FAMILIES

from .encode import (TEXT_DTYPES, EncodeSettings, default_text_length, encode_shards, infer_family, latent_codec,
                     text_encoder)
from .imageops import parse_ratios
from .sources import SOURCES
from .write import MISSING_AESTHETIC_POLICIES, WriteSettings, write_shards

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_size(text: str) -> int:
    """'500M', '1G', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 1000000, 500M or 2G.")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="source (JSON file, image folder, img2dataset folder) or, with --encode, a shard folder")
    parser.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    parser.add_argument("--format", choices=sorted(SOURCES), help="input format when writing shards")
    parser.add_argument("--resolution", type=int, default=1024, help="output side in pixels (default 1024)")
    parser.add_argument("--min-side", type=int, default=None,
                        help="drop images whose shorter side is smaller (default: --resolution, as the paper's filter at 1024)")
    parser.add_argument("--min-aesthetic", type=float, default=5.0, help="drop images scored below (default 5.0)")
    parser.add_argument(
        "--missing-aesthetic", choices=MISSING_AESTHETIC_POLICIES, default="keep",
        help="images without an aesthetic score: keep (counted in the manifest) or drop (default keep)",
    )
    parser.add_argument("--buckets", default=None, metavar="W:H,...", help="aspect buckets, e.g. 1:1,4:3,3:4 (default: square only)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes (default: all cores)")
    parser.add_argument("--max-samples-per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--max-shard-bytes", type=parse_size, default=None, help="split shards above this size, e.g. 1G")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="quality of the stored JPEGs (default 95)")
    enc = parser.add_argument_group("encoding (--encode; one process per GPU under torchrun or srun)")
    enc.add_argument("--encode", action="store_true", help="encode image shards into latent + text-embedding shards")
    enc.add_argument("--model-path", help="local diffusers pipeline folder (vae/, text_encoder*/, tokenizer*/)")
    enc.add_argument("--family", choices=sorted(FAMILIES), help="model family (default: read from model_index.json)")
    enc.add_argument("--text-max-length", type=int, help="text tokens per prompt (default: the family's, e.g. FLUX.1 "
                     "512, SD3.x 154)")
    enc.add_argument("--clip", help="a local CLIP ViT-L/14 folder (openai/clip-vit-large-patch14): Qwen-Image and FLUX.2 "
                     "have no CLIP text encoder, so the discriminator's CLIP condition is computed here")
    enc.add_argument("--text-dtype", choices=sorted(TEXT_DTYPES), default="float16", help="storage dtype of text embeddings")
    enc.add_argument("--batch-size", type=int, default=8, help="images per encoder call (default 8)")
    enc.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the encoders run")
    enc.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="encoder compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _encode(args) if args.encode else _write(args)


def _write(args: argparse.Namespace) -> int:
    if args.format is None:
        raise ConfigError(f"--format is required when writing shards; choose one of {', '.join(sorted(SOURCES))}.")
    try:
        settings = WriteSettings(
            format=args.format,
            input=args.input,
            resolution=args.resolution,
            min_side=args.min_side if args.min_side is not None else args.resolution,
            min_aesthetic=args.min_aesthetic,
            missing_aesthetic=args.missing_aesthetic,
            ratios=parse_ratios(args.buckets),
            max_samples_per_shard=args.max_samples_per_shard,
            max_shard_bytes=args.max_shard_bytes,
            jpeg_quality=args.jpeg_quality,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    manifest = write_shards(settings, args.out, args.workers)
    line = f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to {args.out}"
    inputs = manifest["stats"].get("inputs", 0)
    if inputs and manifest["num_samples"] < inputs / 2:
        st = manifest["stats"]
        reasons = {**st.get("filtered", {}), **st.get("skipped", {})}
        top = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
        line += (f"; only {manifest['num_samples']} of {inputs} inputs were kept ({top}): check --min-side "
                 f"({settings.min_side}) and --min-aesthetic ({settings.min_aesthetic})")
    print(line)
    return 0


def _encode(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from megatron_senseflow.distributed import launch_env, resolve_device

    if not args.model_path:
        raise ConfigError("--encode needs --model-path, the local diffusers pipeline folder of the teacher.")
    family = args.family or infer_family(args.model_path)
    fam = FAMILIES[family]
    if fam.clip_at_encode and not args.clip:
        raise ConfigError(f"{fam.label}'s text encoder is not CLIP, so the discriminator's CLIP ViT-L/14 text condition "
                          "is computed while encoding: pass --clip DIR (a local openai/clip-vit-large-patch14).")
    if args.clip and not fam.clip_at_encode:
        log.warning("--clip %s is not read: %s's own text stack carries CLIP ViT-L/14 already", args.clip, fam.label)
    started_here = False
    if dist.is_initialized():
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    else:
        env = launch_env()
        rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
        if world > 1:  # gloo is enough: the ranks only meet at two barriers
            init = f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
            dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
            started_here = True
    device = resolve_device(args.device, local_rank)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    settings = EncodeSettings(
        input=args.input,
        model_path=args.model_path,
        family=family,
        text_max_length=args.text_max_length or default_text_length(family),
        text_dtype=args.text_dtype,
        clip=args.clip if fam.clip_at_encode else None,
    )
    text = text_encoder(args.model_path, family, settings.text_max_length, device, dtype, args.clip)
    latent = latent_codec(args.model_path, family, device, dtype)
    try:
        barrier = dist.barrier if world > 1 else lambda: None
        manifest = encode_shards(settings, args.out, text, latent, rank, world, barrier, args.batch_size)
    finally:
        if started_here:
            dist.destroy_process_group()
    if manifest is not None:
        print(f"encoded {manifest['num_samples']} samples into {len(manifest['shards'])} shards in {args.out}")
    return 0
