"""SD3 / SD3.5 MMDiT (SD3Transformer2DModel) on megatron-core, with TP, SP and PP.

All blocks are MMDiT joint blocks; the last one's text branch is pre-only
(no projection, no MLP), SD3.5 adds QK RMS-norm and SD3.5 Medium a second,
image-only attention in its first blocks. Stage boundaries carry the joint
sequence [text; image]; the last block always sits on the last stage, so the
text stream it drops never needs to cross one.

Tensor legend: S sequence, B batch, H hidden, C latent channels.
"""
from __future__ import annotations

from typing import Callable

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from ..base import DiTBase, StageLayout
from ..layers import (
    ConditionEmbedder,
    fp8_context,
    maybe_checkpoint,
    replicated_linear,
    sp_scatter,
)
from .arch import SD3Arch


def sincos_2d(embed_dim: int, grid: int, base_size: int) -> torch.Tensor:
    """diffusers get_2d_sincos_pos_embed(embed_dim, grid, base_size=base_size, interpolation_scale=1): [grid*grid, D]."""
    coords = torch.arange(grid, dtype=torch.float64) / (grid / base_size)
    gw, gh = torch.meshgrid(coords, coords, indexing="xy")

    def one_axis(pos, d):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one_axis(gw, embed_dim // 2), one_axis(gh, embed_dim // 2)], dim=1).float()


class PatchEmbed(torch.nn.Module):
    """Conv patchify + a centred crop of the positional grid (diffusers PatchEmbed with pos_embed_max_size).

    Replicated under TP (first stage only, a small conv). The positional grid is
    a persistent buffer, as in diffusers: loaded with the weights, not trained.
    """

    def __init__(self, arch: SD3Arch, config: TransformerConfig):
        super().__init__()
        self.patch_size = arch.patch_size
        self.max_size = arch.pos_embed_max_size
        self.proj = torch.nn.Conv2d(
            arch.in_channels, arch.hidden_size, arch.patch_size, stride=arch.patch_size, dtype=config.params_dtype
        )
        pe = sincos_2d(arch.hidden_size, arch.pos_embed_max_size, arch.sample_size // arch.patch_size)
        self.register_buffer("pos_embed", pe[None].to(config.params_dtype), persistent=True)

    def forward(self, latent_BCHW):
        h, w = latent_BCHW.shape[-2] // self.patch_size, latent_BCHW.shape[-1] // self.patch_size
        if h > self.max_size or w > self.max_size:
            raise ValueError(
                f"latent of {h}x{w} patches exceeds the positional grid {self.max_size}x{self.max_size} of this model."
            )
        x = self.proj(latent_BCHW).flatten(2).transpose(1, 2)
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        pe = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)[:, top : top + h, left : left + w, :]
        return (x + pe.reshape(1, h * w, -1)).to(x.dtype)


class SD3Model(DiTBase):
    def __init__(
        self,
        config: TransformerConfig,
        arch: SD3Arch,
        block_spec: Callable[[int], ModuleSpec],
        layout: StageLayout,
    ):
        """`block_spec(i)` gives the spec of global block i (pre-only and dual attention vary by block)."""
        super().__init__(config, layout)
        self.arch = arch
        H = arch.hidden_size
        head = dict(hidden=H, num_heads=arch.num_attention_heads, head_dim=arch.attention_head_dim)
        self.time_text_embed = ConditionEmbedder(H, arch.pooled_projection_dim, False, config)
        if layout.pre_process:
            self.pos_embed = PatchEmbed(arch, config)
            self.context_embedder = replicated_linear(arch.joint_attention_dim, arch.caption_projection_dim, config)
        self.joint_blocks = torch.nn.ModuleList(
            build_module(block_spec(i), config=config, **head) for i in range(layout.first, layout.last)
        )
        self._offset = layout.first
        if layout.post_process:
            self.init_output_head(arch.out_dim, block_spec(arch.num_layers - 1).submodules.adaln)

    def block_offsets(self):
        return {"joint_blocks": self._offset}

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        num_txt: int | None = None,
    ) -> torch.Tensor:
        """Same inputs as diffusers' SD3Transformer2DModel (timestep = 1000 * sigma).

        `hidden_states` is the latent [B, C, H, W] on every stage (later stages
        only read its shape); `num_txt` is needed on stages after the first.
        Returns the velocity [B, C, H, W] on the last stage, the boundary tensor otherwise.
        """
        from megatron.core import parallel_state as ps

        cfg = self.config
        p = self.arch.patch_size
        h, w = hidden_states.shape[-2] // p, hidden_states.shape[-1] // p
        c_BH = self.time_text_embed(timestep, pooled_projections)
        tp = ps.get_tensor_model_parallel_world_size() if cfg.sequence_parallel else 1

        if self.pre_process:
            img = sp_scatter(self.pos_embed(hidden_states).transpose(0, 1), cfg)
            txt = sp_scatter(self.context_embedder(encoder_hidden_states).transpose(0, 1), cfg)
        else:
            local_txt = (num_txt if num_txt is not None else encoder_hidden_states.shape[1]) // tp
            txt, img = self.input_tensor[:local_txt], self.input_tensor[local_txt:]

        with fp8_context(cfg):  # the blocks' TE linears only; embedders, adaLN and proj_out stay bf16
            for blk in self.joint_blocks:
                if blk.context_pre_only:  # its text output is None: recompute carries the image stream alone
                    img, txt = maybe_checkpoint(cfg, lambda i, x, c, b=blk: b(i, x, c)[0], img, txt, c_BH), None
                else:
                    img, txt = maybe_checkpoint(cfg, lambda i, x, c, b=blk: b(i, x, c), img, txt, c_BH)

        if not self.post_process:
            return torch.cat([txt, img])
        out = self.output_head(img, c_BH)  # [h*w, B, p*p*C]
        b = out.shape[1]
        out = out.transpose(0, 1).reshape(b, h, w, p, p, self.arch.out_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, self.arch.out_channels, h * p, w * p)
