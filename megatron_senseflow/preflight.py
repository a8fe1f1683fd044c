"""What a run needs beyond its settings, checked before anything is built.

config.py checks the settings among themselves; the checks here also need the objective (methods.py decides
whether a run trains the discriminator, `Objective.wants_discriminator`) or the files a training run reads:

- `check(cfg, world_size)`: the settings (Config.validate) and the discriminator's text condition; raises
  ConfigError with one sentence;
- `missing_assets(cfg)`: what a training run (purpose 'training') still needs, one sentence each, and paths
  that cannot be what they should be (from their config files alone), whatever the purpose;
- `stand_ins(cfg)` and `notes(cfg)`: what the start banner and `--dry-run` list (stand-ins a test or demo run
  uses; settings this run will not read).

Every entry point that starts or plans a run (train, the trainer itself, --dry-run, memory-plan, Slurm launch)
goes through `check` and `missing_assets`.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import Config, ConfigError, load_config
from .methods import OBJECTIVES


def wants_discriminator(cfg: Config) -> bool:
    """Whether this run builds and trains the discriminator: the objective decides."""
    return OBJECTIVES[cfg.method].wants_discriminator(cfg)


def check(cfg: Config, world_size: int | None = None) -> None:
    """Raise ConfigError with one sentence for the first thing that cannot run (settings, then what the
    objective's discriminator needs of the model)."""
    cfg.validate(world_size=world_size)
    if not wants_discriminator(cfg):
        return
    dc, arch = cfg.roles.discriminator, cfg.model.teacher_arch()
    width, how = arch.pooled_dim, _clip_from_pooled(cfg)
    if dc.text_condition == "clip_l" and (width < 768 if how == "slice" else width != 768):
        fix = ("in a test or demo recipe (purpose: test) the pooled vector itself can condition the heads "
               "(roles.discriminator.text_condition=pooled)" if cfg.purpose != "training" else
               "a training run needs a teacher whose text stack includes CLIP ViT-L/14 (FLUX.1 and SD3.x "
               "releases do; Qwen-Image and FLUX.2 shards carry it from `prepare-data --encode --clip`), or "
               "the run without the discriminator (roles.discriminator.enabled=false)")
        raise ConfigError(f"the discriminator's text condition is CLIP ViT-L/14's 768-channel text embedding, "
                          f"read from the pooled vector of each batch, but this {arch.label} model's pooled vector "
                          f"is {width} wide, so its text encoder is not CLIP ViT-L/14; {fix}.")


def _clip_from_pooled(cfg: Config) -> str:
    """How the discriminator's CLIP ViT-L/14 condition is read off the pooled vector (models/family.py)."""
    from .models import family_of

    return family_of(cfg.model.teacher_arch()).clip_condition


def reads_clip(cfg: Config) -> bool:
    """Whether this run reads roles.discriminator.clip (FLUX.1's CLIP-L projection for the heads' condition)."""
    dc = cfg.roles.discriminator
    return wants_discriminator(cfg) and dc.text_condition == "clip_l" and _clip_from_pooled(cfg) == "project"


def stand_ins(cfg: Config) -> list[str]:
    """What this run replaces by a stand-in, one phrase each (the start banner lists them)."""
    out = []
    if not cfg.roles.teacher.checkpoint:
        out.append("a random teacher (roles.teacher.checkpoint is not set)")
    if not cfg.data.path:
        out.append("synthetic data (data.path is not set)")
    dc = cfg.roles.discriminator
    if wants_discriminator(cfg):
        if not dc.dinov2 or dc.dinov2 == "tiny":
            out.append(f"a random tiny DINOv2 (roles.discriminator.dinov2={dc.dinov2})")
        if not dc.vae or dc.vae == "pixel":
            out.append("the pixel codec decodes latents for the discriminator (roles.discriminator.vae is not set)")
        if dc.text_condition == "pooled":
            out.append("the pooled text embedding conditions the discriminator instead of CLIP ViT-L/14 "
                       "(roles.discriminator.text_condition=pooled)")
    return out


def missing_assets(cfg: Config, read_files: bool = True) -> list[str]:
    """Sentences naming what a training run (purpose 'training') still needs; empty when it can start.

    Bundled recipes leave these paths null because nothing is downloaded; starting a
    12B run against a random teacher or a random DINOv2 would burn a cluster for nothing.
    Test and demo recipes may run on stand-ins; the banner says which. `read_files`: also check the given
    discriminator paths from their config files (off where the paths are the job's, not this machine's: a Slurm
    login node may not see a container's mounts; the job's ranks check them before building anything).
    """
    missing = _path_problems(cfg) if read_files else []
    if cfg.purpose != "training":
        return missing
    label = cfg.model.preset
    if not cfg.roles.teacher.checkpoint:
        missing.append(f"roles.teacher.checkpoint is not set: a {label} run needs the teacher converted with "
                       f"`senseflow convert import --hf DIR --out CKPT`; pass roles.teacher.checkpoint=CKPT.")
    if not cfg.data.path:
        missing.append(f"data.path is not set: a {label} run needs shards from `senseflow prepare-data`; "
                       f"pass data.path=DIR.")
    dc = cfg.roles.discriminator
    if wants_discriminator(cfg):
        if not dc.dinov2 or dc.dinov2 == "tiny":
            missing.append(f"roles.discriminator.dinov2 is {dc.dinov2!r}: a {label} run needs a local DINOv2 "
                           f"ViT-L/14 directory; pass roles.discriminator.dinov2=DIR (or disable the "
                           f"discriminator with roles.discriminator.enabled=false).")
        if not dc.vae or dc.vae == "pixel":
            missing.append(f"roles.discriminator.vae is {dc.vae!r}: a {label} run decodes latents with the "
                           f"pipeline's VAE; pass roles.discriminator.vae=DIR/vae.")
        if reads_clip(cfg) and not dc.clip:
            missing.append("roles.discriminator.clip is not set: the heads' CLIP ViT-L/14 condition projects "
                           "FLUX's pooled CLIP-L embedding with CLIP's text projection; pass "
                           "roles.discriminator.clip=DIR (a transformers clip-vit-large-patch14).")
        if dc.text_condition == "pooled":
            missing.append("roles.discriminator.text_condition=pooled is a stand-in for tests and the demo; a "
                           "training run conditions the heads on CLIP ViT-L/14 (text_condition=clip_l).")
    return missing


def _path_problems(cfg: Config) -> list[str]:
    """Paths given for the discriminator that cannot be what they should be, found from their config files
    alone (before the teacher and the students are built, whatever the purpose)."""
    dc, out = cfg.roles.discriminator, []
    if not wants_discriminator(cfg):
        return out
    if dc.dinov2 and dc.dinov2 != "tiny":
        cfg_file = Path(dc.dinov2) / "config.json"
        if not cfg_file.is_file():
            out.append(f"roles.discriminator.dinov2={dc.dinov2} is not a transformers DINOv2 directory (no "
                       f"config.json); pass the local facebook/dinov2-large folder.")
        else:
            try:
                depth = int(json.loads(cfg_file.read_text())["num_hidden_layers"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                depth = None
                out.append(f"{cfg_file} cannot be read as a DINOv2 config ({e}); re-download the model.")
            deepest = max(dc.feature_layers, default=-1)
            if depth is not None and deepest >= depth:
                out.append(f"roles.discriminator.dinov2={dc.dinov2} has {depth} blocks, but "
                           f"roles.discriminator.feature_layers={list(dc.feature_layers)} taps block {deepest} "
                           f"(0-based); use DINOv2 ViT-L/14 (24 blocks, the authors' taps) or list only blocks "
                           f"below {depth}.")
    if dc.vae and dc.vae != "pixel" and not (Path(dc.vae) / "config.json").is_file():
        out.append(f"roles.discriminator.vae={dc.vae} is not a diffusers VAE directory (no config.json); pass the "
                   f"teacher pipeline's vae/ folder.")
    if dc.clip and reads_clip(cfg) and not Path(dc.clip).is_dir():
        out.append(f"roles.discriminator.clip={dc.clip} is not a directory; pass a local transformers CLIP "
                   f"ViT-L/14 folder (openai/clip-vit-large-patch14).")
    return out


def notes(cfg: Config) -> list[str]:
    """Settings this run will not read, one sentence each (the start banner and --dry-run print them)."""
    dc, out = cfg.roles.discriminator, []
    if dc.clip and not reads_clip(cfg):
        why = ("this run trains no discriminator" if not wants_discriminator(cfg) else
               "the heads are conditioned on the pooled vector (text_condition=pooled)"
               if dc.text_condition != "clip_l" else
               f"{cfg.model.teacher_arch().label}'s batches carry CLIP ViT-L/14's text embedding already")
        out.append(f"roles.discriminator.clip={dc.clip} is not read: {why}.")
    return out


def load_run_config(recipe: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                    world_size: int | None = None) -> Config:
    """load_config, then `check`: the config of a run about to be started or planned."""
    cfg = load_config(recipe, overrides)
    check(cfg, world_size)
    return cfg
