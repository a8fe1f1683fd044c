"""Latent <-> image codecs: the frozen, differentiable decoder the GAN term and samples go through.

- `DiffusersVAE`: diffusers AutoencoderKL from a local path, with the model's
  shift/scale (latent = (z - shift) * scale), as the data encoder writes it.
- `SpaceToDepth`: an exact, parameter-free codec for pixel-space models (the
  digits demo and tests): an s x s pixel block becomes s*s channels.
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


class DiffusersVAE(nn.Module):
    def __init__(self, path: str, dtype: torch.dtype = torch.float32):
        super().__init__()
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(path, torch_dtype=dtype, local_files_only=True).eval().requires_grad_(False)
        # the generator's GAN term backpropagates through the decoder: at 1024 px its saved
        # activations would be ~9 GB per sample in bf16; checkpointing keeps block inputs only
        self.vae.enable_gradient_checkpointing()
        self.scale = float(self.vae.config.scaling_factor)
        self.shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.latent_channels = self.vae.config.latent_channels
        self.image_channels = self.vae.config.out_channels
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(images_BCHW.to(self.vae.dtype)).latent_dist.mode()
        return (z - self.shift) * self.scale

    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        z = latents_BCHW.to(self.vae.dtype) / self.scale + self.shift
        return self.vae.decode(z).sample


def _pixel_layout(latent_channels: int) -> tuple[int, int]:
    for factor in (1, 2, 4):
        for image_channels in (3, 1):
            if image_channels * factor * factor == latent_channels:
                return factor, image_channels
    raise ValueError(f"no pixel codec gives {latent_channels} latent channels; set discriminator.vae to a VAE path.")


def build_codec(spec: str | None, latent_channels: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """'pixel' / None: SpaceToDepth sized to the model's latent channels; otherwise a local VAE path."""
    if spec in (None, "pixel"):
        return SpaceToDepth(*_pixel_layout(latent_channels))
    return DiffusersVAE(spec, dtype)


def codec_factor(spec: str | None, latent_channels: int) -> int:
    """Pixels per latent side of the codec `build_codec` would build, without loading weights: a VAE's
    2^(levels - 1) from its config.json (8 for FLUX and SD3.x when the path is not there yet)."""
    if spec in (None, "pixel"):
        return _pixel_layout(latent_channels)[0]
    import json
    from pathlib import Path

    cfg = Path(spec) / "config.json"
    if cfg.is_file():
        return 2 ** (len(json.loads(cfg.read_text())["block_out_channels"]) - 1)
    return 8
