"""FLUX.1 (FluxTransformer2DModel) on megatron-core, with TP, SP and PP.

Global block list: double-stream blocks 0..N-1, then single-stream blocks
N..N+M-1; a pipeline stage holds a contiguous range of it. The tensor that
crosses a stage boundary is always the joint sequence [text; image] of shape
[S_txt + S_img, B, H] (per-rank shard under sequence parallel), so the same
p2p shape serves double- and single-block boundaries. The conditioning
vector and the RoPE tables are recomputed on every stage from the batch.

Tensor legend: S sequence, B batch, H hidden, C packed latent channels.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from ..base import DiTBase, StageLayout
from ..layers import (
    ConditionEmbedder,
    FluxRope,
    fp8_context,
    maybe_checkpoint,
    replicated_linear,
    sp_scatter,
)
from .arch import FluxArch


def sp_joint_order(num_txt: int, num_img: int, tp: int, device=None) -> torch.Tensor:
    """Order of tokens after all-gathering per-rank [txt_r; img_r] shards: positions in [txt; img]."""
    lt, li = num_txt // tp, num_img // tp
    parts = []
    for r in range(tp):
        parts.append(torch.arange(r * lt, (r + 1) * lt, device=device))
        parts.append(num_txt + torch.arange(r * li, (r + 1) * li, device=device))
    return torch.cat(parts)


class FluxModel(DiTBase):
    def __init__(
        self,
        config: TransformerConfig,
        arch: FluxArch,
        double_block: ModuleSpec,
        single_block: ModuleSpec,
        layout: StageLayout,
    ):
        super().__init__(config, layout)
        self.arch = arch
        H, N = arch.hidden_size, arch.num_layers
        head = dict(hidden=H, num_heads=arch.num_attention_heads, head_dim=arch.attention_head_dim)

        self.time_text_embed = ConditionEmbedder(H, arch.pooled_projection_dim, arch.guidance_embeds, config)
        self.rope = FluxRope(arch.axes_dims_rope)
        if layout.pre_process:
            self.x_embedder = replicated_linear(arch.in_channels, H, config)
            self.context_embedder = replicated_linear(arch.joint_attention_dim, H, config)
        self.double_blocks = torch.nn.ModuleList(
            build_module(double_block, config=config, **head) for _ in range(layout.first, min(layout.last, N))
        )
        self.single_blocks = torch.nn.ModuleList(
            build_module(single_block, config=config, **head) for _ in range(max(layout.first, N), layout.last)
        )
        self._double_offset = layout.first
        self._single_offset = max(layout.first - N, 0)
        if layout.post_process:
            self.init_output_head(arch.out_dim, double_block.submodules.adaln)

    def block_offsets(self):
        return {"double_blocks": self._double_offset, "single_blocks": self._single_offset}

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Same inputs as diffusers' FluxTransformer2DModel (timestep = sigma in [0, 1], guidance unscaled).

        Returns the velocity [B, S_img, C] on the last stage, the boundary tensor otherwise.
        """
        cfg = self.config
        dtype = pooled_projections.dtype
        # diffusers rounds t and guidance to the activation dtype before scaling; keep that for parity
        t = timestep.to(dtype) * 1000
        g = guidance.to(dtype) * 1000 if guidance is not None else None
        c_BH = self.time_text_embed(t, pooled_projections, g)
        num_txt, num_img = txt_ids.shape[0], img_ids.shape[0]
        rope = self.rope(torch.cat([txt_ids, img_ids]))
        tp = ps.get_tensor_model_parallel_world_size() if cfg.sequence_parallel else 1
        if cfg.sequence_parallel and (num_txt % tp or num_img % tp):
            raise ValueError(
                f"sequence parallel needs text ({num_txt}) and image ({num_img}) token counts divisible by tp={tp}."
            )
        local_txt = num_txt // tp

        if self.pre_process:
            img = sp_scatter(self.x_embedder(hidden_states).transpose(0, 1), cfg)
            txt = sp_scatter(self.context_embedder(encoder_hidden_states).transpose(0, 1), cfg)
        else:
            txt, img = self.input_tensor[:local_txt], self.input_tensor[local_txt:]

        with fp8_context(cfg):  # the blocks' TE linears only; embedders, adaLN and proj_out stay bf16
            for blk in self.double_blocks:
                img, txt = maybe_checkpoint(cfg, lambda i, x, c, b=blk: b(i, x, c, rope), img, txt, c_BH)

            if len(self.single_blocks):
                perm = sp_joint_order(num_txt, num_img, tp, img.device) if cfg.sequence_parallel else None
                x = torch.cat([txt, img])
                for blk in self.single_blocks:
                    x = maybe_checkpoint(cfg, lambda x_, c, b=blk: b(x_, c, rope, perm), x, c_BH)
                txt, img = x[:local_txt], x[local_txt:]

        if not self.post_process:
            return torch.cat([txt, img])
        return self.output_head(img, c_BH).transpose(0, 1)


def pack_latents(latent_BCHW: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: FLUX's 2x2 patch tokens (diffusers _pack_latents)."""
    b, c, h, w = latent_BCHW.shape
    x = latent_BCHW.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens_BSC: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of pack_latents for latent height h and width w."""
    b, _, c4 = tokens_BSC.shape
    x = tokens_BSC.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device=None) -> torch.Tensor:
    """(0, row, col) ids of the packed tokens of an h x w latent (diffusers _prepare_latent_image_ids)."""
    rows = torch.arange(h // 2, device=device).repeat_interleave(w // 2)
    cols = torch.arange(w // 2, device=device).repeat(h // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()


def text_ids(num_tokens: int, device=None) -> torch.Tensor:
    return torch.zeros(num_tokens, 3, device=device)
