"""Qwen-Image (QwenImageTransformer2DModel) on megatron-core, with TP, SP and PP.

Every block is an MMDiT dual-stream block (the same module as FLUX.1's double blocks: adaLN-Zero modulation of
both streams, joint attention with QK RMS-norm, tanh-GELU MLPs); the text stream goes through all of them. What
is Qwen-Image's own: the text embeddings are RMS-normed before their projection, the conditioning vector is the
time embedding alone (sinusoids of sigma scaled by 1000 after the frequencies), the RoPE positions are centred on
the image (rows and columns run from -h/2) with the text after the image's largest half-side on all three axes,
and padded text tokens are masked as keys (Qwen2.5-VL prompts have different lengths).

Stage boundaries carry the joint sequence [text; image], as SD3's; the conditioning vector, RoPE tables and the
key mask are recomputed on every stage from the batch.

Tensor legend: S sequence, B batch, H hidden, C packed latent channels.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from ..base import DiTBase, StageLayout
from ..layers import (
    HeadRMSNorm,
    MLPEmbedder,
    fp8_context,
    mark_pipeline_replicated,
    maybe_checkpoint,
    replicated_linear,
    sp_scatter,
    timestep_embedding,
)
from .arch import QwenImageArch


class QwenTimeEmbedder(torch.nn.Module):
    """The conditioning vector c_BH: QwenTimestepProjEmbeddings (256 sinusoids of 1000 sigma -> SiLU MLP).

    Replicated over TP and recomputed on every pipeline stage (per sample, small)."""

    def __init__(self, hidden: int, config: TransformerConfig):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, hidden, config)
        mark_pipeline_replicated(self)

    def forward(self, sigma_B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # diffusers casts sigma to the activation dtype, rounds the frequencies to it, then scales by 1000
        t = sigma_B.to(dtype)
        return self.timestep_embedder(timestep_embedding(t, scale=1000.0, freq_dtype=t.dtype).to(dtype))


class QwenRope(torch.nn.Module):
    """QwenEmbedRope(scale_rope=True) as cos / sin tables [S, D] of the joint sequence [text; image] (fp32, as
    diffusers computes its complex frequencies)."""

    def __init__(self, axes_dim: tuple[int, ...], theta: float = 10000):
        super().__init__()
        self.axes_dim = tuple(axes_dim)
        self.theta = theta

    @staticmethod
    def positions(num_txt: int, h: int, w: int, device=None) -> torch.Tensor:
        """(frame, row, column) position of every token [num_txt + h * w, 3]: image rows -(h - h//2) .. h//2 - 1 (and
        columns likewise) at frame 0; text k at max(h//2, w//2) + k on every axis."""
        rows = torch.arange(h, device=device) - (h - h // 2)
        cols = torch.arange(w, device=device) - (w - w // 2)
        img = torch.stack([torch.zeros(h * w, dtype=torch.long, device=device), rows.repeat_interleave(w),
                           cols.repeat(h)], dim=-1)
        start = max(h // 2, w // 2)
        txt = torch.arange(start, start + num_txt, device=device)[:, None].expand(-1, 3)
        return torch.cat([txt, img])

    def forward(self, num_txt: int, h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self.positions(num_txt, h, w, device).to(torch.float32)
        cos, sin = [], []
        for i, d in enumerate(self.axes_dim):
            inv = 1.0 / torch.pow(self.theta, torch.arange(0, d, 2, device=device).to(torch.float32).div(d))
            angle = torch.outer(pos[:, i], inv)
            cos.append(angle.cos().repeat_interleave(2, dim=1))
            sin.append(angle.sin().repeat_interleave(2, dim=1))
        return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


class QwenImageModel(DiTBase):
    def __init__(self, config: TransformerConfig, arch: QwenImageArch, block_spec: ModuleSpec, layout: StageLayout):
        super().__init__(config, layout)
        self.arch = arch
        H = arch.hidden_size
        head = dict(hidden=H, num_heads=arch.num_attention_heads, head_dim=arch.attention_head_dim)
        self.time_text_embed = QwenTimeEmbedder(H, config)
        self.rope = QwenRope(arch.axes_dims_rope)
        if layout.pre_process:
            self.txt_norm = HeadRMSNorm(arch.joint_attention_dim, config)  # an RMSNorm over the text width
            self.img_in = replicated_linear(arch.in_channels, H, config)
            self.txt_in = replicated_linear(arch.joint_attention_dim, H, config)
        self.joint_blocks = torch.nn.ModuleList(
            build_module(block_spec, config=config, **head) for _ in range(layout.first, layout.last)
        )
        self._offset = layout.first
        if layout.post_process:
            self.init_output_head(arch.out_dim, block_spec.submodules.adaln)

    def block_offsets(self):
        return {"joint_blocks": self._offset}

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        img_shapes: list,
        encoder_hidden_states_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Same inputs as diffusers' QwenImageTransformer2DModel (timestep = sigma; img_shapes [[(1, h, w)]] per
        sample, every sample the same size; the mask [B, L], 1 for real text tokens, None for none padded).

        `encoder_hidden_states` is needed on every stage (later stages read its length and the mask follows it);
        returns the packed velocity [B, S_img, C] on the last stage, the boundary tensor otherwise.
        """
        cfg = self.config
        dtype = encoder_hidden_states.dtype
        _, h, w = img_shapes[0][0]
        b, num_txt = encoder_hidden_states.shape[:2]
        num_img = h * w
        c_BH = self.time_text_embed(timestep, dtype)
        rope = self.rope(num_txt, h, w, encoder_hidden_states.device)
        mask = None
        if encoder_hidden_states_mask is not None:
            mask = torch.cat([encoder_hidden_states_mask.bool(),
                              torch.ones(b, num_img, dtype=torch.bool, device=encoder_hidden_states.device)], dim=1)
        tp = ps.get_tensor_model_parallel_world_size() if cfg.sequence_parallel else 1
        if cfg.sequence_parallel and (num_txt % tp or num_img % tp):
            raise ValueError(
                f"sequence parallel needs text ({num_txt}) and image ({num_img}) token counts divisible by tp={tp}."
            )
        local_txt = num_txt // tp

        if self.pre_process:
            img = sp_scatter(self.img_in(hidden_states).transpose(0, 1), cfg)
            txt = sp_scatter(self.txt_in(self.txt_norm(encoder_hidden_states)).transpose(0, 1), cfg)
        else:
            txt, img = self.input_tensor[:local_txt], self.input_tensor[local_txt:]

        with fp8_context(cfg):  # the blocks' TE linears only; embedders, adaLN and proj_out stay bf16
            for blk in self.joint_blocks:
                img, txt = maybe_checkpoint(cfg, lambda i, x, c, bk=blk: bk(i, x, c, rope, mask), img, txt, c_BH)

        if not self.post_process:
            return torch.cat([txt, img])
        return self.output_head(img, c_BH).transpose(0, 1)


def text_mask(text_BLD: torch.Tensor) -> torch.Tensor | None:
    """The mask of zero-padded text: QwenImagePipeline pads shorter prompts with zero vectors and masks them; our
    encoder writes the same padding, and a real Qwen2.5-VL hidden state is never all zeros. None when nothing is
    padded (attention then takes its unmasked kernels)."""
    if text_BLD.device.type == "meta":  # a memory probe (shapes only): nothing to read the padding from
        return None
    mask = text_BLD.ne(0).any(dim=-1)
    return None if bool(mask.all()) else mask


