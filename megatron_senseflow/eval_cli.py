"""`senseflow eval`: FID, FID-T, patch FID and CLIP score of a folder of generated images.

    senseflow eval --images samples/ --reference coco5k/ --inception inception-2015-12-05.pt \\
                   --clip /models/clip-vit-large-patch14 --prompts samples/prompts.txt

- FID: torchmetrics' FrechetInceptionDistance on features of the Inception
  network the user supplies locally (`--inception`: the TorchScript
  `inception-2015-12-05.pt` that clean-fid / StyleGAN3 use, which takes uint8
  images and returns 2048-d pool features). No weights are downloaded.
- FID-T (as in the SenseFlow paper): the same, with `--reference` pointing at
  the teacher's many-step samples for the same prompts (`senseflow sample
  --steps 50 --cfg ...` on the teacher checkpoint).
- Patch FID: FID over `--patches-per-image` random 299 x 299 crops of each
  image at full resolution (fixed seed), which sees the detail that resizing to 299 hides.
- CLIP score: 100 * max(cos, 0) of CLIP image and text embeddings, with a local CLIP (`--clip`, a transformers
  CLIPModel + processor directory) on each image and its prompt
  (`--prompts`: one line per image in file-name order, as `senseflow sample` writes
  `prompts.txt`, or a line per prompt index `NNNNN_KK.png`).
- PickScore (`--pickscore`), HPSv2.1 (`--hps` with `--hps-clip`), ImageReward (`--imagereward`) and the LAION
  aesthetic predictor v2 (`--aesthetic`, on `--clip`): the paper's learned scores, each as its reference code
  computes it (megatron_senseflow/image_rewards.py), from local files.
Images are read in sorted file-name order; PNG/JPEG/WebP.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

EXTS = {".png", ".jpg", ".jpeg", ".webp"}


class InceptionFeatures(nn.Module):
    """Wraps a TorchScript Inception (uint8 NCHW -> 2048 pool features) for torchmetrics' FID.

    The feature width is read off one probe forward, so another TorchScript feature
    network with the same calling convention works too.
    """

    def __init__(self, path: str):
        super().__init__()
        self.net = torch.jit.load(path, map_location="cpu").eval()
        with torch.no_grad():
            self.num_features = int(self(torch.zeros(1, 3, 299, 299, dtype=torch.uint8)).shape[-1])

    def forward(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x_uint8.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x.round().clamp(0, 255).to(torch.uint8), return_features=True)


MIN_FID_IMAGES = 1000  # below this a Frechet distance over 2048-dim Inception features is mostly noise


def list_images(folder: str | Path) -> list[Path]:
    if not Path(folder).is_dir():
        raise ValueError(f"{folder} is not a folder of images.")
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in EXTS)
    if not files:
        raise ValueError(f"{folder} holds no PNG/JPEG/WebP images.")
    return files


def load_uint8(path: Path) -> torch.Tensor:
    from PIL import Image

    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def smallest_side(files: list[Path]) -> int:
    """The smallest image side among files (read from their headers, not decoded)."""
    from PIL import Image

    sides = []
    for f in files:
        with Image.open(f) as im:
            sides.append(min(im.size))
    return min(sides)


def random_patches(img: torch.Tensor, size: int, count: int, g: torch.Generator) -> list[torch.Tensor]:
    _, h, w = img.shape
    if h < size or w < size:
        return [F.interpolate(img[None].float(), size=(size, size), mode="bilinear")[0].to(torch.uint8)]
    ys = torch.randint(0, h - size + 1, (count,), generator=g)
    xs = torch.randint(0, w - size + 1, (count,), generator=g)
    return [img[:, y : y + size, x : x + size] for y, x in zip(ys.tolist(), xs.tolist())]


def fid(feature: nn.Module, generated: list[Path], reference: list[Path], batch: int = 32,
        patches: int = 0, patch_size: int = 299, seed: int = 0) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    from .progress import bar

    metric = FrechetInceptionDistance(feature=feature, normalize=False)
    g = torch.Generator().manual_seed(seed)
    for files, real in ((reference, True), (generated, False)):
        pending: list[torch.Tensor] = []
        what = ("patch FID" if patches else "FID") + (" reference" if real else " images")
        for f in bar(iterable=files, total=len(files), desc=what, unit="img"):
            img = load_uint8(f)
            if patches:
                pending.extend(random_patches(img, patch_size, patches, g))
            else:
                pending.append(F.interpolate(img[None].float(), size=(299, 299), mode="bilinear")[0].to(torch.uint8))
            while len(pending) >= batch:
                metric.update(torch.stack(pending[:batch]), real=real)
                pending = pending[batch:]
        if pending:
            metric.update(torch.stack(pending), real=real)
    return float(metric.compute())


def load_clip(clip_dir: str):
    """(model, processor) of a local transformers CLIP directory (CLIP, or PickScore_v1 in that format)."""
    from transformers import CLIPModel, CLIPProcessor

    return (CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval(),
            CLIPProcessor.from_pretrained(clip_dir, local_files_only=True))


def _features(out) -> torch.Tensor:
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).float()


def select_captions(clip_dir: str, images: list[Path], annotations: str) -> list[str]:
    """COCO-5K prompts: for each image, the caption of its COCO annotations with the highest CLIP score.

    `annotations` is COCO's captions file (captions_val2017.json: "images" with id and
    file_name, "annotations" with image_id and caption); images are matched by file name.
    """
    import json as _json

    coco = _json.loads(Path(annotations).read_text())
    by_id = {im["id"]: im["file_name"] for im in coco["images"]}
    caps: dict[str, list[str]] = {}
    for a in coco["annotations"]:
        caps.setdefault(Path(by_id[a["image_id"]]).stem, []).append(a["caption"].strip())
    missing = [p.name for p in images if p.stem not in caps]
    if missing:
        raise ValueError(f"{len(missing)} images have no caption in {annotations}, e.g. {missing[:3]}.")
    model, proc = load_clip(clip_dir)
    chosen = []
    for p in images:
        options = caps[p.stem]
        inputs = proc(text=options, images=[load_uint8(p)], return_tensors="pt", padding=True, truncation=True)
        with torch.no_grad():
            img = _features(model.get_image_features(pixel_values=inputs["pixel_values"]))
            txt = _features(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))
        chosen.append(options[int(F.cosine_similarity(img, txt).argmax())])
    return chosen


def clip_cosines(model, proc, images: list, prompts: list[str], batch: int, load=load_uint8) -> torch.Tensor:
    """cos(image embedding, its prompt's embedding) per image, through a transformers CLIP on its own device.
    `images` are files (read by `load`, a batch at a time) or, with `load=None`, uint8 [3, H, W] tensors."""
    from .progress import bar

    device = next(model.parameters()).device
    out = []
    starts = range(0, len(images), batch)
    for i in bar(iterable=starts, total=len(starts), desc="CLIP", unit="batch", enabled=False if load is None else None):
        imgs = [load(p) if load is not None else p for p in images[i : i + batch]]
        inputs = proc(text=prompts[i : i + batch], images=imgs, return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.no_grad():
            img = _features(model.get_image_features(pixel_values=inputs["pixel_values"]))
            txt = _features(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))
        out.append(F.cosine_similarity(img, txt).cpu())
    return torch.cat(out)


def clip_score_of(cosines: torch.Tensor) -> float:
    """CLIPScore: mean of 100 * max(cos(image, prompt), 0)."""
    return float((100 * cosines.clamp(min=0)).mean())


def pick_score_of(model, cosines: torch.Tensor) -> float:
    """PickScore: the model's learned logit scale times the mean cosine (no clamping)."""
    return float(model.logit_scale.exp().item() * cosines.mean())


def clip_score(clip_dir: str, images: list[Path], prompts: list[str], batch: int = 16) -> float:
    """Mean of 100 * max(cos(image, prompt), 0) over the images (the CLIPScore definition).

    Computed here rather than through torchmetrics' CLIPScore, which breaks on
    transformers 5 (its get_*_features return model outputs, not tensors).
    """
    model, proc = load_clip(clip_dir)
    return clip_score_of(clip_cosines(model, proc, images, prompts, batch))


def pick_score(pick_dir: str, images: list[Path], prompts: list[str], batch: int = 16) -> float:
    """Mean PickScore (Kirstain et al. 2023): logit_scale.exp() * cos(image, prompt), as the PickScore_v1
    reference code computes it (its learned scale, about 100; no clamping). `pick_dir` is a local
    transformers CLIP directory: the weights of yuvalkirstain/PickScore_v1 with the processor files of
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K copied beside them."""
    model, proc = load_clip(pick_dir)
    return pick_score_of(model, clip_cosines(model, proc, images, prompts, batch))


def prompts_for(images: list[Path], prompts_file: str) -> list[str]:
    lines = [ln.strip() for ln in Path(prompts_file).read_text().splitlines() if ln.strip()]
    if len(lines) == len(images):
        return lines
    try:  # senseflow sample names files PROMPTINDEX_SAMPLE.png
        return [lines[int(p.stem.split("_")[0])] for p in images]
    except (ValueError, IndexError):
        raise ValueError(
            f"{prompts_file} has {len(lines)} prompts for {len(images)} images; give one per image "
            "or name images NNNNN_KK.png by prompt index (as `senseflow sample` does)."
        ) from None


METRICS = ("fid", "patch_fid", "clip", "pickscore", "hpsv2", "imagereward", "aesthetic")


def learned_scorer(metric: str, hps=None, hps_clip=None, imagereward=None, aesthetic=None, clip=None):
    """The scorer of one of the learned scores (image_rewards.py), or a sentence naming what it needs."""
    from .config import ConfigError
    from .image_rewards import AestheticV2, HPSv2, ImageReward, ScoreError

    try:
        if metric == "hpsv2":
            if not hps or not hps_clip:
                raise ConfigError("HPSv2 needs --hps (HPS_v2.1_compressed.pt) and --hps-clip (a ViT-H-14 transformers "
                                  "folder for its config and tokenizer).")
            return HPSv2(hps, hps_clip)
        if metric == "imagereward":
            if not imagereward:
                raise ConfigError("ImageReward needs --imagereward (a folder with ImageReward.pt, med_config.json and "
                                  "vocab.txt).")
            return ImageReward(imagereward)
        if not aesthetic or not clip:
            raise ConfigError("the aesthetic score needs --aesthetic (sac+logos+ava1-l14-linearMSE.pth) and --clip "
                              "(CLIP ViT-L/14).")
        return AestheticV2(aesthetic, clip)
    except ScoreError as e:
        raise ConfigError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="folder of generated images")
    p.add_argument("--reference", help="folder of reference images (real images for FID, teacher samples for FID-T)")
    p.add_argument("--inception", help="local TorchScript Inception (inception-2015-12-05.pt) for FID / patch FID")
    p.add_argument("--clip", help="local transformers CLIP directory for CLIP score")
    p.add_argument("--pickscore", help="local PickScore_v1 directory (transformers CLIP format, with its processor files)")
    p.add_argument("--hps", metavar="FILE", help="local HPS_v2.1_compressed.pt (HPSv2.1; with --hps-clip)")
    p.add_argument("--hps-clip", metavar="DIR", help="local ViT-H-14 transformers folder for --hps: its config and "
                   "tokenizer (laion/CLIP-ViT-H-14-laion2B-s32B-b79K, or the PickScore_v1 folder)")
    p.add_argument("--imagereward", metavar="DIR", help="folder with ImageReward.pt, med_config.json and "
                   "bert-base-uncased's vocab.txt")
    p.add_argument("--aesthetic", metavar="FILE", help="local sac+logos+ava1-l14-linearMSE.pth (LAION aesthetic "
                   "predictor v2; on the --clip ViT-L/14)")
    p.add_argument("--prompts", help="prompts of the generated images (for CLIP score and the learned scores)")
    p.add_argument("--metrics", default="fid,patch_fid,clip",
                   help=f"comma list of {', '.join(METRICS)}")
    p.add_argument("--patches-per-image", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", help="write the results as JSON here (with --select-captions: the prompts file)")
    p.add_argument("--select-captions", metavar="COCO_CAPTIONS_JSON",
                   help="COCO-5K protocol: write, for each image in --images, its highest-CLIP-score caption to --out")


def run(args: argparse.Namespace, feature: nn.Module | None = None) -> int:
    from .config import ConfigError

    if args.select_captions:
        if not args.clip or not args.out:
            raise ConfigError("--select-captions needs --clip (a local CLIP directory) and --out (the prompts file).")
        try:
            lines = select_captions(args.clip, list_images(args.images), args.select_captions)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {len(lines)} prompts to {args.out}")
        return 0
    wanted = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(METRICS))
    if unknown:
        raise ConfigError(f"--metrics {unknown} unknown; choose from {', '.join(METRICS)}.")
    try:
        images = list_images(args.images)
        results: dict[str, float] = {"num_images": len(images)}
        if {"fid", "patch_fid"} & set(wanted):
            if not args.reference or not (args.inception or feature is not None):
                raise ConfigError("FID needs --reference (a folder of images) and --inception (a local TorchScript Inception).")
            feature = feature if feature is not None else InceptionFeatures(args.inception)
            reference = list_images(args.reference)
            few = min(len(images), len(reference))
            if few < MIN_FID_IMAGES:
                print(f"warning: FID from {few} images is dominated by sampling noise (its covariances are 2048 x 2048); "
                      f"the paper's protocol uses 5000 (COCO-5K), use at least {MIN_FID_IMAGES} for a number to "
                      "compare.", file=sys.stderr)
            if "fid" in wanted:
                results["fid"] = fid(feature, images, reference, args.batch)
            if "patch_fid" in wanted:
                small_gen, small_ref = (smallest_side(f) for f in (images, reference))
                if small_gen < 299 and small_ref < 299:
                    print(f"warning: every image is below the 299 px patch (the smallest: {min(small_gen, small_ref)} px):"
                          " patch FID resizes each whole image instead of cropping, so it equals FID here.",
                          file=sys.stderr)
                elif min(small_gen, small_ref) < 299:
                    which, side = ("generated", small_gen) if small_gen < 299 else ("reference", small_ref)
                    print(f"warning: some {which} images are below the 299 px patch ({side} px): those are resized "
                          "whole while the larger ones are cropped, so patch FID compares unlike things; generate "
                          "and keep the reference at the same resolution (the paper's: 1024 px).", file=sys.stderr)
                results["patch_fid"] = fid(feature, images, reference, args.batch, patches=args.patches_per_image)
        if "clip" in wanted:
            if not args.clip or not args.prompts:
                raise ConfigError("CLIP score needs --clip (a local CLIP directory) and --prompts.")
            results["clip_score"] = clip_score(args.clip, images, prompts_for(images, args.prompts), min(args.batch, 16))
        if "pickscore" in wanted:
            if not args.pickscore or not args.prompts:
                raise ConfigError("PickScore needs --pickscore (a local PickScore_v1 directory) and --prompts.")
            results["pickscore"] = pick_score(args.pickscore, images, prompts_for(images, args.prompts), min(args.batch, 16))
        from .progress import bar

        for metric in ("hpsv2", "imagereward", "aesthetic"):
            if metric not in wanted:
                continue
            if metric != "aesthetic" and not args.prompts:  # before loading a model of several GB
                raise ConfigError(f"{metric} scores each image against its prompt: pass --prompts.")
            scorer = learned_scorer(metric, args.hps, args.hps_clip, args.imagereward, args.aesthetic, args.clip)
            prompts = prompts_for(images, args.prompts) if args.prompts else [None] * len(images)
            step = min(args.batch, 16)
            starts = range(0, len(images), step)
            results[metric] = float(torch.cat([scorer.scores(images[i : i + step], prompts[i : i + step])
                                               for i in bar(iterable=starts, total=len(starts), desc=metric,
                                                            unit="batch")]).double().mean())
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None
    for k, v in results.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0
