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
