"""FLUX.2's VAE (AutoencoderKLFlux2) as a latent codec: the posterior mode, patchified 2 x 2 and normalised by
the VAE's batch-norm running statistics, the latent Flux2Pipeline denoises ([B, 4 x 32, H/16, W/16])."""
from __future__ import annotations

import torch

from ..vae import LatentCodec


def patchify(z: torch.Tensor) -> torch.Tensor:
    """Flux2Pipeline._patchify_latents: [B, C, H, W] -> [B, 4C, H/2, W/2] (channel-major, then the 2 x 2 offsets)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = z.shape
    return z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


class Flux2VAE(LatentCodec):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        # the generator's GAN term backpropagates through the decoder: keep block inputs only
        self.vae.enable_gradient_checkpointing()
        cfg = self.vae.config
        bn = self.vae.bn
        self.register_buffer("mean", bn.running_mean.detach().float().view(1, -1, 1, 1).clone(), persistent=False)
        self.register_buffer("std", torch.sqrt(bn.running_var.detach().float().view(1, -1, 1, 1) + cfg.batch_norm_eps),
                             persistent=False)
        patch = tuple(cfg.patch_size)
        self.latent_channels = int(cfg.latent_channels) * patch[0] * patch[1]
        self.image_channels = int(cfg.out_channels)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1) * patch[0]

    @classmethod
    def from_pretrained(cls, vae_dir, dtype=torch.float32, device="cpu") -> "Flux2VAE":
        from diffusers import AutoencoderKLFlux2

        return cls(AutoencoderKLFlux2.from_pretrained(vae_dir, torch_dtype=dtype, local_files_only=True).to(device))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        z = patchify(self.vae.encode(images.to(p.device, p.dtype)).latent_dist.mode())
        return (z.float() - self.mean) / self.std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        z = latents.to(p.dtype) * self.std.to(p.dtype) + self.mean.to(p.dtype)
        return self.vae.decode(unpatchify(z)).sample

    def describe(self) -> dict:
        return {"latent_channels": self.latent_channels, "vae_scale_factor": self.factor,
                "bn_mean": self.mean.flatten().tolist(), "bn_std": self.std.flatten().tolist(),
                "latent": "posterior mode, patchified 2 x 2, (z - bn_mean) / bn_std"}
