"""README's "Qwen-Image and FLUX.2: the 2025 teachers on one node", run as written (tests/test_walkthrough.py's
harness, a module of its own so that the two walk-throughs can run on the two test workers at once): LoRA students
on the shared base, merged into the stock QwenImagePipeline."""
from __future__ import annotations

import numpy as np
import pytest

from tests.test_walkthrough import QWEN_SECTION, build_data, build_discriminator_models, differs_from_teacher, \
    euler_sample, first_noise, run_block

pytestmark = pytest.mark.slow


def test_readme_walkthrough_qwen_image(tmp_path):
    from diffusers import QwenImagePipeline

    from megatron_senseflow.models.flux.model import pack_latents
    from tests.data_helpers import save_full_pipeline

    work = tmp_path / "work"
    models = work / "models"
    models.mkdir(parents=True)
    # 8 heads, so that the recipe's TP=8 (its --dry-run card) divides them
    save_full_pipeline(models / "Qwen-Image", "qwen_image", num_attention_heads=8, attention_head_dim=8,
                       axes_dims_rope=(2, 2, 4))
    build_discriminator_models(models, tmp_path)
    build_data(work)
    run_block(work, QWEN_SECTION, "qwen")
    assert differs_from_teacher(work / "student-qwen" / "transformer", models / "Qwen-Image" / "transformer")

    ours = euler_sample(work, "qwen", "models/Qwen-Image")
    pipe = QwenImagePipeline.from_pretrained(work / "student-qwen")
    image = pipe("a photo of the cat", height=64, width=64, num_inference_steps=4,
                 latents=pack_latents(first_noise(4, 16)), output_type="np").images[0]
    stock = np.round(image * 255).astype(np.int16)
    assert np.abs(stock - ours).max() <= 1, np.abs(stock - ours).max()
