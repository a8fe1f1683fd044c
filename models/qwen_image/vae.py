"""Qwen-Image's VAE (AutoencoderKLQwenImage, a causal 3D VAE run on one frame) as a latent codec: latents are the
posterior mode normalised per channel, (z - latents_mean) / latents_std, as QwenImagePipeline expects them."""
from __future__ import annotations

import torch

from ..vae import LatentCodec


class QwenImageVAE(LatentCodec):
    def __init__(self, vae):
        super().__init__()
        # no gradient checkpointing in this diffusers class: the generator's GAN term keeps the decoder's
        # activations (memory_plan counts them as the FLUX.1 decoder's without checkpointing)
        self.vae = vae.eval().requires_grad_(False)
        cfg = self.vae.config
        z = int(cfg.z_dim)
        self.register_buffer("mean", torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, z, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, z, 1, 1), persistent=False)
        self.latent_channels = z
        self.image_channels = int(getattr(cfg, "input_channels", 3))
        self.factor = 2 ** len(cfg.temperal_downsample)

    @classmethod
    def from_pretrained(cls, vae_dir, dtype=torch.float32, device="cpu") -> "QwenImageVAE":
        from diffusers import AutoencoderKLQwenImage

        return cls(AutoencoderKLQwenImage.from_pretrained(vae_dir, torch_dtype=dtype, local_files_only=True).to(device))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        z = self.vae.encode(images[:, :, None].to(p.device, p.dtype)).latent_dist.mode()[:, :, 0]
        return (z.float() - self.mean) * (1.0 / self.std)  # the img2img pipeline's (z - mean) * (1 / std)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        # the pipeline's `latents / (1 / latents_std) + latents_mean`, in the VAE's dtype
        z = latents.to(p.dtype) / (1.0 / self.std.to(p.dtype)) + self.mean.to(p.dtype)
        return self.vae.decode(z[:, :, None]).sample[:, :, 0]

    def describe(self) -> dict:
        return {"latent_channels": self.latent_channels, "vae_scale_factor": self.factor,
                "latents_mean": self.mean.flatten().tolist(), "latents_std": self.std.flatten().tolist(),
                "latent": "posterior mode of one frame, (z - latents_mean) / latents_std"}
