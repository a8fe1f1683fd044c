"""Qwen-Image and FLUX.2 (dev and klein) from a diffusers pipeline to samples and back to a stock pipeline.

For each family a complete tiny pipeline (transformer with random non-zero weights, the released scheduler
settings, VAE, text stack) is built from diffusers / transformers components; its transformer is converted
(`convert import`), sampled by `senseflow sample` (4 Euler steps at the family's own shift), exported with
`--base-pipeline`, and the exported folder is loaded by the family's stock diffusers pipeline, whose default
4-step call from the same noise must draw the same image to one grey level: the export's scheduler and
pipeline settings (Qwen-Image without the terminal stretch, klein marked distilled) make the stock call sample
as we do. (Parity of the DiTs, conversion round trips, encoders: test_model_parity, test_convert, test_data_encode.)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.data_helpers import save_full_pipeline
from tests.dist_helpers import run_distributed

pytestmark = pytest.mark.slow
FAMILIES = ("qwen_image", "flux2", "flux2_klein")
PROMPT = "a photo of the cat"
RES = 32


def _import_all(env, root: str):
    from megatron_senseflow.tools.convert_checkpoint import import_checkpoint

    for fam in FAMILIES:
        import_checkpoint(Path(root) / fam / "pipe", Path(root) / fam / "ckpt", progress=False)
    return True


def _export_all(env, root: str):
    from megatron_senseflow.tools.convert_checkpoint import export_checkpoint

    for fam in FAMILIES:
        export_checkpoint(Path(root) / fam / "ckpt", Path(root) / fam / "student",
                          base_pipeline=Path(root) / fam / "pipe", link="symlink", progress=False)
    return True


def _sample(env, root: str, fam: str, guidance: float):
    from megatron_senseflow.sample_cli import add_arguments, run

    p = argparse.ArgumentParser()
    add_arguments(p)
    d = Path(root) / fam
    args = p.parse_args(["--ckpt", str(d / "ckpt"), "--prompts", str(Path(root) / "prompts.txt"), "--out",
                         str(d / "samples"), "--text-encoder", str(d / "pipe"), "--sampler", "euler", "--steps", "4",
                         "--resolution", str(RES), "--guidance", str(guidance)])
    return run(args)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    for fam in FAMILIES:
        save_full_pipeline(root / fam / "pipe", fam)
    (root / "prompts.txt").write_text(PROMPT + "\n")
    run_distributed(_import_all, 1, str(root))
    run_distributed(_export_all, 1, str(root))
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_teacher_samples_like_the_stock_pipeline_of_its_export(exported, family):
    import diffusers

    from megatron_senseflow.models.checkpoint_io import checkpoint_arch

    d = exported / family
    arch = checkpoint_arch(d / "ckpt")
    assert run_distributed(_sample, 1, str(exported), family, 4.0) == [0]
    from PIL import Image

    ours = np.asarray(Image.open(d / "samples" / "00000_00.png"), dtype=np.int16)

    pipe = diffusers.DiffusionPipeline.from_pretrained(d / "student")
    assert type(pipe).__name__ == json.loads((d / "pipe" / "model_index.json").read_text())["_class_name"]
    # the export changes the base pipeline's settings in copies, never the base (linked with --link symlink)
    base_sched = json.loads((d / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    if family == "qwen_image":
        assert pipe.scheduler.config.shift_terminal is None and base_sched["shift_terminal"] == 0.02
    if family == "flux2_klein":
        assert pipe.config.is_distilled is True
        assert json.loads((d / "pipe" / "model_index.json").read_text())["is_distilled"] is False
    # the noise senseflow sample drew (seed 0, one prompt), in the layout the stock pipeline takes
    from megatron_senseflow.models import family_of

    side = RES // family_of(arch).vae_factor(d / "pipe" / "vae")
    noise = torch.randn(1, arch.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    if family == "qwen_image":
        from megatron_senseflow.models.flux.model import pack_latents

        latents = pack_latents(noise)
    else:
        latents = noise
    image = pipe(prompt=PROMPT, height=RES, width=RES, num_inference_steps=4, latents=latents, output_type="np").images[0]
    stock = np.round(image * 255).astype(np.int16)
    assert stock.shape == ours.shape
    diff = np.abs(stock - ours).max()
    assert diff <= 1, f"{family}: the stock pipeline's default 4-step call differs from ours by {diff} grey levels"
    assert ours.std() > 2, "the image is not flat (a random model draws structure)"


def _sample_sd3(env, root: str):
    from megatron_senseflow.sample_cli import add_arguments, run
    from megatron_senseflow.tools.convert_checkpoint import import_checkpoint

    d = Path(root)
    import_checkpoint(d / "pipe", d / "ckpt", progress=False)
    p = argparse.ArgumentParser()
    add_arguments(p)
    return run(p.parse_args(["--ckpt", str(d / "ckpt"), "--prompts", str(d / "prompts.txt"), "--out", str(d / "samples"),
                             "--text-encoder", str(d / "pipe"), "--sampler", "euler", "--steps", "4", "--resolution",
                             str(RES)]))


def test_an_sd3_export_samples_at_the_anchors_with_the_printed_call(tmp_path):
    """StableDiffusion3Pipeline's default 4 steps are not the anchors (1, .9, .75, .5); no scheduler config can make
    them so while the timestep stays 1000 sigma. `senseflow export` prints the call that does, and that call on the
    exported pipeline draws our Euler sample to one grey level."""
    import re
    import subprocess
    import sys

    import diffusers
    from PIL import Image

    from tests.data_helpers import CLIP_LEN, tiny_components, tiny_transformer

    components = tiny_components("sd3")
    transformer = tiny_transformer("tiny-sd3", joint_attention_dim=40, pooled_projection_dim=20)
    diffusers.StableDiffusion3Pipeline(transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                                       **components).save_pretrained(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text(PROMPT + "\n")
    assert run_distributed(_sample_sd3, 1, str(tmp_path)) == [0]
    r = subprocess.run([sys.executable, "-m", "megatron_senseflow.cli", "export", "--ckpt", str(tmp_path / "ckpt"),
                        "--out", str(tmp_path / "student"), "--base-pipeline", str(tmp_path / "pipe"), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    call = re.search(r"call it as (StableDiffusion3Pipeline.*\))", r.stdout)
    assert call and "num_inference_steps=4, sigmas=[1, 0.75, 0.5, 0.25], guidance_scale=1.0" in call.group(1), r.stdout

    ours = np.asarray(Image.open(tmp_path / "samples" / "00000_00.png"), dtype=np.int16)
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(tmp_path / "student")
    noise = torch.randn(1, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt=PROMPT, height=RES, width=RES, latents=noise, output_type="np", guidance_scale=1.0,
              max_sequence_length=77 + 77 - CLIP_LEN)  # ours: the SD3.x family's 154 tokens, CLIP's 16 first

    def grey_levels(**extra):
        return int(np.abs(np.round(pipe(**kw, **extra).images[0] * 255).astype(np.int16) - ours).max())

    assert grey_levels(num_inference_steps=4, sigmas=[1.0, 0.75, 0.5, 0.25]) <= 1
    assert grey_levels(num_inference_steps=4) > 1  # the default call samples elsewhere
