"""Transformer blocks: the MMDiT joint block (FLUX double-stream, SD3/SD3.5) and FLUX's single-stream block.

Tensor legend: S sequence, B batch, H hidden; `img` image stream, `txt` text
stream, `c_BH` the conditioning vector. Submodules come from a layer spec.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from .layers import AdaLNModulation, layer_norm, modulate


@dataclass
class MMDiTBlockSubmodules:
    adaln: ModuleSpec | type
    """Image-stream modulation linear (6 chunks, 9 with dual attention)."""
    adaln_context: ModuleSpec | type
    """Text-stream modulation linear (6 chunks; 2 for a context pre-only block)."""
    attention: ModuleSpec
    """Joint attention over [text; image]."""
    mlp: ModuleSpec
    """Image-stream MLP."""
    mlp_context: ModuleSpec | None = None
    """Text-stream MLP; None for a context pre-only block."""
    attention2: ModuleSpec | None = None
    """SD3.5 Medium (MMDiT-X): a second, image-only self-attention."""


class MMDiTBlock(MegatronModule):
    """Double-stream block: diffusers FluxTransformerBlock and JointTransformerBlock."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MMDiTBlockSubmodules,
        hidden: int,
        num_heads: int,
        head_dim: int,
        context_pre_only: bool = False,
    ):
        super().__init__(config)
        s = submodules
        self.context_pre_only = context_pre_only
        self.dual = s.attention2 is not None
        self.adaln = AdaLNModulation(config, hidden, 9 if self.dual else 6, s.adaln)
        self.adaln_context = AdaLNModulation(config, hidden, 2 if context_pre_only else 6, s.adaln_context)
        attn_kw = dict(hidden=hidden, num_heads=num_heads, head_dim=head_dim)
        self.attention = build_module(s.attention, config=config, **attn_kw)
        self.attention2 = build_module(s.attention2, config=config, **attn_kw) if self.dual else None
        self.mlp = build_module(s.mlp, config=config, hidden=hidden, ffn_hidden=4 * hidden)
        self.mlp_context = (
            build_module(s.mlp_context, config=config, hidden=hidden, ffn_hidden=4 * hidden) if not context_pre_only else None
        )

    def forward(self, img_SBH, txt_SBH, c_BH, rope=None, mask=None):
        mods = self.adaln(c_BH)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        img_norm = layer_norm(img_SBH)
        if self.context_pre_only:
            c_scale, c_shift = self.adaln_context(c_BH)
            txt_in = modulate(layer_norm(txt_SBH), c_shift, c_scale)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.adaln_context(c_BH)
            txt_in = modulate(layer_norm(txt_SBH), c_shift_msa, c_scale_msa)

        attn_img, attn_txt = self.attention(modulate(img_norm, shift_msa, scale_msa), txt_in, rope, mask=mask)
        img = img_SBH + gate_msa[None] * attn_img
        if self.dual:
            shift2, scale2, gate2 = mods[6:]
            attn2, _ = self.attention2(modulate(img_norm, shift2, scale2))
            img = img + gate2[None] * attn2
        img = img + gate_mlp[None] * self.mlp(modulate(layer_norm(img), shift_mlp, scale_mlp))

        if self.context_pre_only:
            return img, None
        txt = txt_SBH + c_gate_msa[None] * attn_txt
        txt = txt + c_gate_mlp[None] * self.mlp_context(modulate(layer_norm(txt), c_shift_mlp, c_scale_mlp))
        return img, txt


@dataclass
class SingleBlockSubmodules:
    adaln: ModuleSpec | type
    """Modulation linear (shift, scale, gate)."""
    attention: ModuleSpec
    """Self-attention over the joint sequence, without output projection."""
    linear_mlp_fc1: ModuleSpec | type
    """H -> 4H, column-parallel (diffusers proj_mlp)."""
    linear_proj: ModuleSpec | type
    """Row-parallel projection of [attention; MLP] -> H (diffusers proj_out); packed, see below."""


class FluxSingleBlock(MegatronModule):
    """FLUX single-stream block: attention and MLP in parallel, one output projection.

    `linear_proj` takes the concatenation of this rank's attention heads and
    MLP columns, so one GEMM and one all-reduce serve both branches. Its local
    weight is therefore [W_attn[:, r] | W_mlp[:, r]]; the weight carries
    `packed_split = (attn_width, mlp_width)` so checkpoints and weight loading
    split it back into the two TP-independent halves.
    """

    def __init__(self, config: TransformerConfig, submodules: SingleBlockSubmodules, hidden: int, num_heads: int, head_dim: int):
        super().__init__(config)
        s = submodules
        inner, ffn = num_heads * head_dim, 4 * hidden
        self.adaln = AdaLNModulation(config, hidden, 3, s.adaln)
        self.attention = build_module(s.attention, config=config, hidden=hidden, num_heads=num_heads, head_dim=head_dim)
        self.linear_mlp_fc1 = build_module(
            s.linear_mlp_fc1, hidden, ffn, config=config, init_method=config.init_method, bias=True,
            gather_output=False, skip_bias_add=False, is_expert=False,
        )
        self.linear_proj = build_module(
            s.linear_proj, inner + ffn, hidden, config=config, init_method=config.output_layer_init_method, bias=True,
            input_is_parallel=True, skip_bias_add=False, is_expert=False,
        )
        self.linear_proj.weight.packed_split = (inner, ffn)

    def forward(self, x_SBH, c_BH, rope=None, perm=None):
        shift, scale, gate = self.adaln(c_BH)
        h = modulate(layer_norm(x_SBH), shift, scale)
        attn, _ = self.attention(h, None, rope, perm)
        mlp, _ = self.linear_mlp_fc1(h)
        out, _ = self.linear_proj(torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=-1))
        return x_SBH + gate[None] * out
