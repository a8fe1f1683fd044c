"""Vision-foundation-model discriminator of SenseFlow: frozen DINOv2 features + trainable heads.

Each hooked DINOv2 block gives a token map [B, C, h, w]. A head turns it into
per-location logits by projection conditioning (as in the authors' VFM-GAN and
StyleGAN-T): out = <cls(main(x)), cmap(text) + refmap(ref)> / sqrt(cmap_dim),
where `text` is the pooled CLIP text embedding already in every batch (FLUX:
CLIP-L pooled; SD3: CLIP-L + CLIP-G) and `ref` is the same block's features of
the paired real image. Logits average over locations and heads.

The DINOv2 backbone is frozen but differentiable: the generator's GAN term
backpropagates through it (and through the frozen VAE decoder) into x0_hat.
The module is replicated on every rank; its grads are averaged over DP only.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_dinov2(spec: str, image_size: int, num_layers: int) -> nn.Module:
    """A transformers Dinov2Model from a local path, or 'tiny' (random, built from a config; tests and demo)."""
    from transformers import Dinov2Config, Dinov2Model

    if spec == "tiny":
        cfg = Dinov2Config(
            hidden_size=32,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            mlp_ratio=2,
            patch_size=4,
            image_size=image_size,
        )
        return Dinov2Model(cfg)
    return Dinov2Model.from_pretrained(spec, local_files_only=True)


# --------------------------------------------------------------------------- DiffAugment


class DiffAugment:
    """Differentiable augmentations (Zhao et al. 2020): 'color', 'translation', 'cutout'.

    Draws come from the caller's per-sample streams (rng.BatchRandom), so a
    resumed or re-laid-out run repeats them.
    """

    def __init__(self, policy: str):
        self.policies = [p.strip() for p in policy.split(",") if p.strip()]
        bad = set(self.policies) - {"color", "translation", "cutout"}
        if bad:
            raise ValueError(f"unknown DiffAugment policies {sorted(bad)}; use color, translation, cutout.")

    def __call__(self, x: torch.Tensor, rnd) -> torch.Tensor:
        for p in self.policies:
            x = getattr(self, p)(x, rnd)
        return x

    def color(self, x, rnd):
        dev = x.device
        x = x + (rnd.rand(1, 1, 1).to(dev, x.dtype) - 0.5)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (rnd.rand(1, 1, 1).to(dev, x.dtype) * 2) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (rnd.rand(1, 1, 1).to(dev, x.dtype) + 0.5) + mean

    def translation(self, x, rnd, ratio: float = 0.125):
        b, _, h, w = x.shape
        sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
        tx = (rnd.rand().cpu() * (2 * sh + 1)).long() - sh
        ty = (rnd.rand().cpu() * (2 * sw + 1)).long() - sw
        gy = torch.arange(h).view(1, h, 1) + tx.view(b, 1, 1)
        gx = torch.arange(w).view(1, 1, w) + ty.view(b, 1, 1)
        gy, gx = gy.clamp(-1, h).to(x.device) + 1, gx.clamp(-1, w).to(x.device) + 1
        padded = F.pad(x, [1, 1, 1, 1])
        bi = torch.arange(b, device=x.device).view(b, 1, 1)
        return padded.permute(0, 2, 3, 1)[bi, gy, gx].permute(0, 3, 1, 2)

    def cutout(self, x, rnd, ratio: float = 0.5):
        b, _, h, w = x.shape
        ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
        oy = (rnd.rand().cpu() * (h + (1 - ch % 2))).long()
        ox = (rnd.rand().cpu() * (w + (1 - cw % 2))).long()
        ys = torch.arange(ch).view(1, ch, 1) + oy.view(b, 1, 1) - ch // 2
        xs = torch.arange(cw).view(1, 1, cw) + ox.view(b, 1, 1) - cw // 2
        ys, xs = ys.clamp(0, h - 1).to(x.device), xs.clamp(0, w - 1).to(x.device)
        mask = torch.ones(b, h, w, device=x.device, dtype=x.dtype)
        mask[torch.arange(b, device=x.device).view(b, 1, 1), ys, xs] = 0
        return x * mask.unsqueeze(1)


# --------------------------------------------------------------------------- heads


def _sn_conv(cin: int, cout: int, k: int) -> nn.Module:
    return spectral_norm(nn.Conv2d(cin, cout, k, padding=k // 2, padding_mode="circular"))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return (self.fn(x) + x) / math.sqrt(2)


def _trunk(channels: int) -> nn.Sequential:
    return nn.Sequential(
        _sn_conv(channels, channels, 1),
        nn.LeakyReLU(0.2),
        _Residual(nn.Sequential(_sn_conv(channels, channels, 3), nn.LeakyReLU(0.2))),
    )


class DiscriminatorHead(nn.Module):
    def __init__(self, channels: int, text_dim: int, cmap_dim: int = 64):
        super().__init__()
        self.cmap_dim = cmap_dim
        self.main = _trunk(channels)
        self.cls = _sn_conv(channels, cmap_dim, 1)
        self.refmapper = nn.Sequential(_trunk(channels), _sn_conv(channels, cmap_dim, 1))
        self.cmapper = nn.Linear(text_dim, cmap_dim)

    def forward(self, feat_BCHW, text_BP, ref_BCHW):
        out = self.cls(self.main(feat_BCHW))
        cond = self.cmapper(text_BP)[:, :, None, None] + self.refmapper(ref_BCHW)
        return (out * cond).sum(1) / math.sqrt(self.cmap_dim)  # [B, h, w]


class VFMDiscriminator(nn.Module):
    def __init__(self, dinov2: nn.Module, feature_layers: list[int], text_dim: int, image_size: int,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        # bf16 runs DINOv2 and the heads under autocast (weights and AdamW states stay fp32)
        self.compute_dtype = compute_dtype
        self.dinov2 = dinov2.eval().requires_grad_(False)
        n = dinov2.config.num_hidden_layers
        bad = [i for i in feature_layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"discriminator.feature_layers {bad} are outside the DINOv2's {n} blocks.")
        self.feature_layers = list(feature_layers)
        self.image_size = image_size
        c = dinov2.config.hidden_size
        self.heads = nn.ModuleList(DiscriminatorHead(c, text_dim) for _ in self.feature_layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        # Always eval: the backbone is frozen, and spectral norm must not advance its
        # power iteration on every forward (ranks run different numbers of forwards,
        # e.g. only the last pipeline stage evaluates the GAN term); see advance_spectral_norm.
        return super().train(False)

    @torch.no_grad()
    def advance_spectral_norm(self):
        """One power iteration of every spectral-normalised weight; once per discriminator update, on all ranks."""
        from torch.nn.utils import parametrize

        for m in self.heads.modules():
            if parametrize.is_parametrized(m, "weight"):
                for p in m.parametrizations.weight:
                    p.train()
                _ = m.weight
                for p in m.parametrizations.weight:
                    p.eval()

    def trainable_parameters(self):
        return self.heads.parameters()

    def features(self, images_BCHW: torch.Tensor) -> list[torch.Tensor]:
        """DINOv2 token maps of images in [-1, 1] (1 or 3 channels) at each hooked block."""
        x = images_BCHW
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x.float(), size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        x = x.to(next(self.dinov2.parameters()).dtype)
        hidden = self.dinov2(pixel_values=x, output_hidden_states=True).hidden_states
        side = self.image_size // self.dinov2.config.patch_size
        maps = []
        for i in self.feature_layers:
            tokens = hidden[i + 1][:, 1:]  # hidden_states[0] is the embedding; drop CLS
            maps.append(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side).float())
        return maps

    def forward(self, images_BCHW, text_BP, ref_maps: list[torch.Tensor]) -> torch.Tensor:
        """Logit per sample: mean over heads and locations."""
        with self._autocast(images_BCHW):
            maps = self.features(images_BCHW)
            logits = [head(f, text_BP.float(), r) for head, f, r in zip(self.heads, maps, ref_maps)]
        return torch.stack([lg.float().mean(dim=(1, 2)) for lg in logits]).mean(0)

    def reference_maps(self, images_BCHW) -> list[torch.Tensor]:
        """Features of the paired real images, at the discriminator's precision."""
        with self._autocast(images_BCHW):
            return self.features(images_BCHW)

    def _autocast(self, x):
        on = self.compute_dtype != torch.float32
        return torch.autocast(device_type=x.device.type, dtype=self.compute_dtype, enabled=on)


# --------------------------------------------------------------------------- the role


class DiscriminatorRole:
    """The replicated discriminator as a role: the trainable heads with their AdamW, the frozen codec
    that decodes latents for it, and its augmentation. Same update interface as the DiT roles
    (`zero_grad`, `step`, `lr`), so the trainer's NaN policy treats every role alike."""

    name = "discriminator"

    def __init__(self, net: VFMDiscriminator, codec: nn.Module, optimizer: torch.optim.Optimizer, augment: DiffAugment,
                 clip_grad: float = 1.0):
        self.net, self.codec, self.optimizer, self.augment, self.clip_grad = net, codec, optimizer, augment, clip_grad

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> tuple[bool, float]:
        """Average the head grads over data parallel (every rank holds the same heads), clip, AdamW."""
        _mean_grads_over_dp(list(self.net.trainable_parameters()))
        norm = float(torch.nn.utils.clip_grad_norm_(self.net.trainable_parameters(), self.clip_grad))
        self.optimizer.step()
        return True, norm

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # checkpoint part: the heads and AdamW state, replicated, so rank 0 writes them and every rank
    # reads them back (weights_only: a checkpoint file is data, never code)
    FILE = "discriminator.pt"

    def save_state(self, step_dir) -> None:
        import torch.distributed as dist

        if dist.get_rank() == 0:
            torch.save({"heads": self.net.heads.state_dict(), "optimizer": self.optimizer.state_dict()},
                       step_dir / self.FILE)

    def load_state(self, step_dir) -> None:
        device = next(self.net.heads.parameters()).device
        d = torch.load(step_dir / self.FILE, map_location=device, weights_only=True)
        self.net.heads.load_state_dict(d["heads"])
        self.optimizer.load_state_dict(d["optimizer"])


def _mean_grads_over_dp(params: list[torch.Tensor]) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    dp = ps.get_data_parallel_world_size()
    if not grads or dp == 1:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=ps.get_data_parallel_group())
    flat /= dp
    for g, s in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(s)
