"""Vision-foundation-model discriminator of SenseFlow, as the authors build it (their vfmgan.py, V).

Features: a frozen DINOv2 ViT-L/14 sees the decoded image at its own resolution
(their crop_plan 'none', fix_res_dino False: 73 x 73 patches at 1024 px, the
position grid resized bilinearly); taps are the patch embedding with position
and the outputs of blocks 2, 5, 8, 10, 14, 19, 23 (8 maps, V350), each with the
CLS token added to every patch token (their AddReadout) and laid out as a
[B, C, h, w] map.

Heads (DiscHeadPlus_2d, V305-341): a trunk of spectral-normalised convolutions
with local batch norm and LeakyReLU, three of them stride 2; a projection
conditioned on the text and on the same tap of the paired real image:
  logits = <cls(trunk(x)), cmapper(c) + refmapper(ref)> / sqrt(64)   per location,
with c the L2-normalised CLIP ViT-L/14 text embedding (their CLIP().encode_text,
StyleGAN-T's wrapper; `text_condition`). Logits of all heads and locations are
concatenated per sample; the losses (losses.py) apply per location.

Two choices of ours, both equal to the authors' runs: local batch norm uses
each sample's own statistics (theirs groups 8 samples of a rank's batch, and they
train one sample per GPU; per sample keeps a run independent of how samples are
spread over ranks), and the spectral-norm power iteration advances three times
per iteration at the points where their heads run a forward in training mode
(the generator's GAN term, the real and the fake discriminator pass), on every
rank alike (`advance_spectral_norm`), because under pipeline parallelism only
the last stage evaluates the generator's term.

The DINOv2 backbone is frozen but differentiable: the generator's GAN term
backpropagates through it (and through the frozen VAE decoder) into x0_hat.
The module is replicated on every rank; its grads are averaged over DP only.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_L_DIM = 768  # width of CLIP ViT-L/14's text embedding (the heads' condition)


def build_dinov2(spec: str, num_layers: int, image_size: int = 224) -> nn.Module:
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


def clip_text_projection(directory: str) -> torch.Tensor:
    """CLIP ViT-L/14's text_projection weight [768, 768] from a local transformers directory (only that tensor)."""
    from safetensors import safe_open

    from .errors import UserError

    files = sorted(Path(directory).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            if "text_projection.weight" in sf.keys():
                w = sf.get_tensor("text_projection.weight").float()
                if tuple(w.shape) != (CLIP_L_DIM, CLIP_L_DIM):
                    raise UserError(f"{f}: text_projection.weight is {tuple(w.shape)}, not CLIP ViT-L/14's "
                                    f"({CLIP_L_DIM}, {CLIP_L_DIM}); roles.discriminator.clip must be CLIP ViT-L/14.")
                return w
    raise UserError(f"roles.discriminator.clip={directory} holds no text_projection.weight in a .safetensors file; "
                    "pass a transformers CLIP ViT-L/14 directory (openai/clip-vit-large-patch14).")


class TextCondition(nn.Module):
    """The heads' text condition from the pooled vector every batch carries (no text encoder runs per step).

    'clip_l': the authors' CLIP().encode_text, L2-normalised CLIP ViT-L/14 text features, read off the pooled
    vector as the family says (models/family.py `clip_condition`): 'slice' takes its first 768 channels (SD3.x's
    pooled embedding is [CLIP-L text_embeds (768) | CLIP-G text_embeds (1280)], StableDiffusion3Pipeline; Qwen-Image
    and FLUX.2 carry CLIP-L's text_embeds computed at encode time); 'project' applies CLIP's own text_projection
    (FLUX.1's pooled vector is CLIP-L's pooler output before it). 'pooled': the pooled vector as is (tests, demo).
    """

    def __init__(self, mode: str, clip_from_pooled: str, pooled_dim: int, projection: torch.Tensor | None = None):
        super().__init__()
        self.mode, self.clip_from_pooled = mode, clip_from_pooled
        self.dim = CLIP_L_DIM if mode == "clip_l" else pooled_dim
        self.register_buffer("projection", projection, persistent=False)

    def forward(self, pooled_BP: torch.Tensor) -> torch.Tensor:
        if self.mode == "pooled":
            return pooled_BP.float()
        if self.clip_from_pooled == "slice":
            feats = pooled_BP[:, :CLIP_L_DIM].float()
        else:
            feats = pooled_BP.float() @ self.projection.t()
        return F.normalize(feats, dim=-1)


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


class AuthorsSpectralNorm(nn.Module):
    """The authors' SpectralConv2d (V): torch's legacy `torch.nn.utils.spectral_norm` hook (SpectralNorm.apply
    with one power iteration, dim 0, eps 1e-12), as a parametrization. Against torch's
    `parametrizations.spectral_norm` it differs in two ways that change the heads' scale early in a run:
    u and v start as normalised N(0, 1) draws with no warm-up (torch runs 15 power iterations at
    construction), and each training-mode forward updates v, then u (torch: u, then v). sigma = u^T W v with
    u and v held constant for the gradient, as both do. The buffers carry torch's names (`_u`, `_v`), so
    `VFMDiscriminator.advance_spectral_norm` drives both kinds alike."""

    def __init__(self, weight: torch.Tensor, eps: float = 1e-12):
        super().__init__()
        self.eps = eps
        mat = weight.detach().flatten(1)
        u = mat.new_empty(mat.shape[0]).normal_(0, 1)  # u, then v, from the global stream (their apply())
        v = mat.new_empty(mat.shape[1]).normal_(0, 1)
        self.register_buffer("_u", F.normalize(u, dim=0, eps=eps))
        self.register_buffer("_v", F.normalize(v, dim=0, eps=eps))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mat = weight.flatten(1)
        if self.training:
            with torch.no_grad():
                self._v.copy_(F.normalize(torch.mv(mat.t(), self._u), dim=0, eps=self.eps))
                self._u.copy_(F.normalize(torch.mv(mat, self._v), dim=0, eps=self.eps))
        u, v = self._u.clone(), self._v.clone()
        return weight / torch.dot(u, torch.mv(mat, v))


def _sn_conv(cin: int, cout: int, k: int, stride: int = 1, sn: str = "torch") -> nn.Module:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, padding_mode="circular")
    if sn == "authors":
        from torch.nn.utils import parametrize

        # unsafe: skip the registration's trial evaluation, which would run a power iteration (shape and dtype
        # are the weight's by construction)
        parametrize.register_parametrization(conv, "weight", AuthorsSpectralNorm(conv.weight), unsafe=True)
        return conv
    return spectral_norm(conv, eps=1e-12)


class LocalNorm(nn.Module):
    """The authors' BatchNormLocal at one sample per group: each sample normalised over its own locations."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x_BCHW):
        mean = x_BCHW.mean(dim=(2, 3), keepdim=True)
        var = x_BCHW.var(dim=(2, 3), keepdim=True, unbiased=False)
        x = (x_BCHW - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[None, :, None, None] + self.bias[None, :, None, None]


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return (self.fn(x) + x) / math.sqrt(2)


def _block(channels: int, k: int, sn: str) -> nn.Sequential:
    return nn.Sequential(_sn_conv(channels, channels, k, sn=sn), LocalNorm(channels), nn.LeakyReLU(0.2))


def _trunk(channels: int, downsample: int, sn: str) -> nn.Sequential:
    """make_block_2d(k=1), then two residual k=3 blocks, with a stride-2 convolution after each of the first
    `downsample` stages (V305-320)."""
    down = [_sn_conv(channels, channels, 3, stride=2, sn=sn) if downsample > i else nn.Identity() for i in range(3)]
    return nn.Sequential(_block(channels, 1, sn), down[0], _Residual(_block(channels, 3, sn)), down[1],
                         _Residual(_block(channels, 3, sn)), down[2])


class FullyConnected(nn.Module):
    """StyleGAN's FullyConnectedLayer (the authors' cmapper): N(0, 1) weights scaled by 1/sqrt(in) at use."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.gain = 1 / math.sqrt(in_features)

    def forward(self, x):
        return torch.addmm(self.bias.to(x.dtype)[None], x, (self.weight.to(x.dtype) * self.gain).t())


class DiscriminatorHead(nn.Module):
    """DiscHeadPlus_2d: projection-conditioned per-location logits from one feature map."""

    def __init__(self, channels: int, text_dim: int, downsample: int = 3, cmap_dim: int = 64, sn: str = "torch"):
        super().__init__()
        self.cmap_dim = cmap_dim
        self.main = _trunk(channels, downsample, sn)
        self.cls = _sn_conv(channels, cmap_dim, 1, sn=sn)
        self.cmapper = FullyConnected(text_dim, cmap_dim)
        self.refmapper = nn.Sequential(*_trunk(channels, downsample, sn), _sn_conv(channels, cmap_dim, 1, sn=sn))

    def forward(self, feat_BCHW, text_BP, ref_BCHW):
        out = self.cls(self.main(feat_BCHW))
        cond = self.cmapper(text_BP)[:, :, None, None] + self.refmapper(ref_BCHW)
        return (out * cond).sum(1) / math.sqrt(self.cmap_dim)  # [B, h, w]


def head_param_count(channels: int, text_dim: int, downsample: int = 3, cmap_dim: int = 64) -> int:
    """Parameters of one DiscriminatorHead (for the memory plan): two trunks of (19 + 9 d) C^2 + (9 + d) C,
    the 1 x 1 projections to cmap_dim and the text mapper. 96.6 M per head at C = 1024, d = 3."""
    c = channels
    trunk = (19 + 9 * downsample) * c * c + (9 + downsample) * c
    return 2 * trunk + 2 * (c * cmap_dim + cmap_dim) + text_dim * cmap_dim + cmap_dim


class VFMDiscriminator(nn.Module):
    def __init__(self, dinov2: nn.Module, feature_layers: list[int], text_dim: int, image_size: int | None = None,
                 patch_features: bool = True, downsample: int = 3, compute_dtype: torch.dtype = torch.float32,
                 spectral_norm: str = "torch"):
        super().__init__()
        # bf16 runs DINOv2 and the heads under autocast (weights and AdamW states stay fp32)
        self.compute_dtype = compute_dtype
        self.dinov2 = dinov2.eval().requires_grad_(False)
        n = dinov2.config.num_hidden_layers
        bad = [i for i in feature_layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"discriminator.feature_layers {bad} are outside the DINOv2's {n} blocks.")
        self.feature_layers = list(feature_layers)
        self.patch_features = patch_features
        self.image_size = image_size
        self.patch = dinov2.config.patch_size
        c = dinov2.config.hidden_size
        # the authors' ModuleDict order: one head per hooked block, then the patch embedding's
        num_maps = len(self.feature_layers) + int(patch_features)
        self.heads = nn.ModuleList(DiscriminatorHead(c, text_dim, downsample, sn=spectral_norm) for _ in range(num_maps))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        # Always eval: the backbone is frozen, and spectral norm must not advance its power
        # iteration on every forward (ranks run different numbers of forwards, e.g. only the
        # last pipeline stage evaluates the GAN term); see advance_spectral_norm.
        return super().train(False)

    @torch.no_grad()
    def advance_spectral_norm(self):
        """One power iteration of every spectral-normalised weight (on all ranks alike)."""
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

    def _position(self, h: int, w: int) -> torch.Tensor:
        """DINOv2's position embedding resized bilinearly to an h x w grid (their _resize_pos_embed)."""
        pos = self.dinov2.embeddings.position_embeddings
        cls_pos, grid = pos[:, :1], pos[0, 1:]
        side = int(math.sqrt(grid.shape[0]))
        grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bilinear", align_corners=False).to(pos.dtype)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

    def features(self, images_BCHW: torch.Tensor) -> list[torch.Tensor]:
        """DINOv2 taps of images in [-1, 1] (1 or 3 channels): block maps in order, then the patch embedding."""
        x = images_BCHW
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x.float() + 1) / 2
        if self.image_size is not None and x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="area")
        x = (x - self.mean) / self.std
        emb = self.dinov2.embeddings
        x = x.to(emb.patch_embeddings.projection.weight.dtype)
        tokens = emb.patch_embeddings.projection(x).flatten(2).transpose(1, 2)
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        hidden = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self._position(h, w)
        taps = {"patch": hidden}
        for i, layer in enumerate(self.dinov2.encoder.layer[: max(self.feature_layers) + 1]):
            if torch.is_grad_enabled():  # the generator's term backpropagates through every block
                hidden = torch.utils.checkpoint.checkpoint(layer, hidden, use_reentrant=False)
            else:
                hidden = layer(hidden)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # transformers 4 returns a tuple
            if i in self.feature_layers:
                taps[i] = hidden
        order = self.feature_layers + (["patch"] if self.patch_features else [])
        maps = []
        for key in order:
            t = taps[key]
            t = t[:, 1:] + t[:, :1]  # the CLS token added to every patch token
            maps.append(t.transpose(1, 2).reshape(t.shape[0], -1, h, w).float())
        return maps

    def forward(self, images_BCHW, text_BC, ref_maps: list[torch.Tensor]) -> torch.Tensor:
        """Logits [B, N]: every head's locations, concatenated (their `torch.cat(logits, dim=1)`)."""
        with self._autocast(images_BCHW):
            maps = self.features(images_BCHW)
            logits = [head(f, text_BC.float(), r) for head, f, r in zip(self.heads, maps, ref_maps)]
        return torch.cat([lg.float().flatten(1) for lg in logits], dim=1)

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
                 text: TextCondition, clip_grad: float = 1.0, warmup_steps: int = 0):
        self.net, self.codec, self.optimizer, self.augment, self.clip_grad = net, codec, optimizer, augment, clip_grad
        self.text = text
        # stepped every iteration like the DiT roles' schedules (the authors' d_lr_scheduler, F947)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda it: min(1.0, it / warmup_steps) if warmup_steps else 1.0)

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

    def step_schedule(self) -> None:
        self.scheduler.step()

    # checkpoint part: the heads and AdamW state, replicated, so rank 0 writes them and every rank
    # reads them back (weights_only: a checkpoint file is data, never code)
    FILE = "discriminator.pt"

    def save_state(self, step_dir, async_save: bool = False) -> list:
        import torch.distributed as dist

        if hasattr(self.optimizer, "consolidate_state_dict"):  # AdamW states sharded over data parallel
            self.optimizer.consolidate_state_dict(to=0)
        if dist.get_rank() == 0:
            torch.save({"heads": self.net.heads.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, step_dir / self.FILE)
        return []

    def load_state(self, step_dir) -> None:
        device = next(self.net.heads.parameters()).device
        d = torch.load(step_dir / self.FILE, map_location=device, weights_only=True)
        self.net.heads.load_state_dict(d["heads"])
        self.optimizer.load_state_dict(d["optimizer"])
        self.scheduler.load_state_dict(d["scheduler"])


def _mean_grads_over_dp(params: list[torch.Tensor]) -> None:
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_world_size() > 1:
        all_reduce_grads(params, ps.get_data_parallel_group(), mean=True)


def all_reduce_grads(params: list[torch.Tensor], group, mean: bool = False, missing_as_zero: bool = False) -> None:
    """Sum (or average) the params' grads over `group` in one flat collective. `missing_as_zero`: a param
    without a grad takes part as zeros and gets the reduced grad (ranks that did not compute a term)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if missing_as_zero:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    if mean:
        flat /= dist.get_world_size(group)
    for g, s in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(s)
