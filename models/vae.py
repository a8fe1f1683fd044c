"""The teachers' VAEs as latent codecs: images in [-1, 1] <-> the latent space the DiT denoises.

One interface for offline encoding (`senseflow prepare-data --encode`), sampling, evaluation and the
discriminator (whose generator term backpropagates through `decode`): each family returns its codec from
`Family.vae`. FLUX.1 and SD3.x use `KLCodec` (diffusers AutoencoderKL, latent = (z - shift) * scale); Qwen-Image
and FLUX.2 define theirs in their folders. Encoding takes the posterior's mode, not a sample: an encoded set is
then a pure function of its images, and the posterior's spread is far below the noise training adds anyway.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn


class LatentCodec(nn.Module):
    """images [B, 3, H, W] in [-1, 1] <-> latents [B, C, H / factor, W / factor] (frozen, differentiable)."""

    latent_channels: int
    image_channels: int = 3
    factor: int
    """Pixels per latent side."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior mode, normalised as the DiT was trained; float32 on the codec's device."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        """What an encoded-shard manifest records about the latents."""
        raise NotImplementedError


def read_config(vae_dir) -> dict:
    path = Path(vae_dir) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


class KLCodec(LatentCodec):
    """diffusers AutoencoderKL with the model's shift/scale: latent = (z - shift_factor) * scaling_factor."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        # the generator's GAN term backpropagates through the decoder: at 1024 px its saved
        # activations would be ~9 GB per sample in bf16; checkpointing keeps block inputs only
        self.vae.enable_gradient_checkpointing()
        cfg = self.vae.config
        self.scale = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)  # SD-style VAEs have none
        self.latent_channels = int(cfg.latent_channels)
        self.image_channels = int(cfg.out_channels)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, vae_dir, dtype=torch.float32, device="cpu") -> "KLCodec":
        from diffusers import AutoencoderKL

        return cls(AutoencoderKL.from_pretrained(vae_dir, torch_dtype=dtype, local_files_only=True).to(device))

    @staticmethod
    def factor_of(config: dict) -> int:
        return 2 ** (len(config["block_out_channels"]) - 1) if "block_out_channels" in config else 8

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        return (z.float() - self.shift) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype) / self.scale + self.shift
        return self.vae.decode(z).sample

    def describe(self) -> dict:
        return {"latent_channels": self.latent_channels, "vae_scale_factor": self.factor,
                "shift_factor": self.shift, "scaling_factor": self.scale,
                "latent": "posterior mode, (z - shift_factor) * scaling_factor"}
