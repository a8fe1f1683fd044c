"""Latent <-> image codecs: the frozen, differentiable decoder the GAN term and samples go through.

- a family's VAE (models/vae.py, `Family.vae`) from a local path: the latents the data encoder wrote;
- `SpaceToDepth`: an exact, parameter-free codec for pixel-space models (the digits demo and tests): an
  s x s pixel block becomes s*s channels.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SpaceToDepth(nn.Module):
    def __init__(self, factor: int = 2, image_channels: int = 1):
        super().__init__()
        self.factor = factor
        self.image_channels = image_channels
        self.latent_channels = image_channels * factor * factor

    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images_BCHW, self.factor)

    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents_BCHW, self.factor)


def _pixel_layout(latent_channels: int) -> tuple[int, int]:
    for factor in (1, 2, 4):
        for image_channels in (3, 1):
            if image_channels * factor * factor == latent_channels:
                return factor, image_channels
    raise ValueError(f"no pixel codec gives {latent_channels} latent channels; set discriminator.vae to a VAE path.")


def build_codec(spec: str | None, arch, dtype: torch.dtype = torch.float32) -> nn.Module:
    """'pixel' / None: SpaceToDepth sized to the model's latent channels; otherwise the local VAE folder of the
    teacher's family."""
    if spec in (None, "pixel"):
        return SpaceToDepth(*_pixel_layout(arch.latent_channels))
    from megatron_senseflow.models import family_of

    return family_of(arch).vae(spec, dtype)


def codec_factor(spec: str | None, arch) -> int:
    """Pixels per latent side of the codec `build_codec` would build, without loading weights."""
    if spec in (None, "pixel"):
        return _pixel_layout(arch.latent_channels)[0]
    from megatron_senseflow.models import family_of

    return family_of(arch).vae_factor(spec)
