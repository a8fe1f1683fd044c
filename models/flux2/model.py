"""FLUX.2 (Flux2Transformer2DModel) on megatron-core, with TP, SP and PP.

Global block list: double-stream blocks 0..N-1, then single-stream blocks N..N+M-1, as FLUX.1. What differs:
- modulation is shared: three column-parallel linears of the conditioning vector (double image stream, double
  text stream, single) computed once per stage and handed to every block of their kind (diffusers
  `double_stream_modulation_img` / `_txt`, `single_stream_modulation`); they live on every stage, like the
  embedders, and their gradients are summed over the pipeline;
- MLPs are SwiGLU (silu(gate) * up, width 3 h), their input linear packed [gate | up] per TP rank;
- the single block's one input projection [q; k; v; gate; up] (diffusers `to_qkv_mlp_proj`) is a column-parallel
  linear packed per TP rank as [this rank's heads' q/k/v (per head) | gate | up], its output projection
  row-parallel over [attention | MLP] like FLUX.1's;
- no linear has a bias; RoPE has 4 axes (theta 2000); the conditioning vector is the time (+ guidance)
  embedding alone.

Tensor legend: S sequence, B batch, H hidden, N heads on this TP rank, D head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from ..base import DiTBase, StageLayout
from ..layers import (
    AdaLNModulation,
    FluxRope,
    MLPEmbedder,
    apply_rope,
    fp8_context,
    layer_norm,
    mark_pipeline_replicated,
    maybe_checkpoint,
    modulate,
    replicated_linear,
    sp_scatter,
    timestep_embedding,
)
from .arch import Flux2Arch


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """diffusers Flux2SwiGLU: silu of the first half times the second half (this rank's [gate | up] columns)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# --------------------------------------------------------------------------- blocks


@dataclass
class SwiGLUSubmodules:
    linear_fc1: ModuleSpec | type
    """H -> 2 x ffn as [gate | up], column-parallel and packed so each rank holds its share of both."""
    linear_fc2: ModuleSpec | type
    """ffn -> H, row-parallel."""


class SwiGLUMLP(MegatronModule):
    """diffusers Flux2FeedForward without biases."""

    def __init__(self, config: TransformerConfig, submodules: SwiGLUSubmodules, hidden: int, ffn_hidden: int):
        super().__init__(config)
        self.linear_fc1 = build_module(
            submodules.linear_fc1, hidden, 2 * ffn_hidden, config=config, init_method=config.init_method, bias=False,
            gather_output=False, skip_bias_add=False, is_expert=False,
        )
        self.linear_fc1.weight.packed_split = (ffn_hidden, ffn_hidden)
        self.linear_fc1.weight.packed_names = ("gate", "up")
        self.linear_fc2 = build_module(
            submodules.linear_fc2, ffn_hidden, hidden, config=config, init_method=config.output_layer_init_method,
            bias=False, input_is_parallel=True, skip_bias_add=False, is_expert=False,
        )

    def forward(self, x_SBH):
        h, _ = self.linear_fc1(x_SBH)
        out, _ = self.linear_fc2(swiglu(h))
        return out


@dataclass
class Flux2DoubleSubmodules:
    attention: ModuleSpec
    """Joint attention over [text; image] (models.layers.JointAttention without biases)."""
    mlp: ModuleSpec
    """Image-stream SwiGLU MLP."""
    mlp_context: ModuleSpec
    """Text-stream SwiGLU MLP."""


class Flux2DoubleBlock(MegatronModule):
    """diffusers Flux2TransformerBlock: an MMDiT block whose modulation (two sets of shift / scale / gate per
    stream) comes from the model's shared linears."""

    def __init__(self, config: TransformerConfig, submodules: Flux2DoubleSubmodules, hidden: int, num_heads: int,
                 head_dim: int, ffn_hidden: int):
        super().__init__(config)
        s = submodules
        self.attention = build_module(s.attention, config=config, hidden=hidden, num_heads=num_heads, head_dim=head_dim)
        self.mlp = build_module(s.mlp, config=config, hidden=hidden, ffn_hidden=ffn_hidden)
        self.mlp_context = build_module(s.mlp_context, config=config, hidden=hidden, ffn_hidden=ffn_hidden)

    def forward(self, img_SBH, txt_SBH, mods_img, mods_txt, rope=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods_img
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = mods_txt
        attn_img, attn_txt = self.attention(modulate(layer_norm(img_SBH), shift_msa, scale_msa),
                                            modulate(layer_norm(txt_SBH), c_shift_msa, c_scale_msa), rope)
        img = img_SBH + gate_msa[None] * attn_img
        img = img + gate_mlp[None] * self.mlp(modulate(layer_norm(img), shift_mlp, scale_mlp))
        txt = txt_SBH + c_gate_msa[None] * attn_txt
        txt = txt + c_gate_mlp[None] * self.mlp_context(modulate(layer_norm(txt), c_shift_mlp, c_scale_mlp))
        return img, txt


@dataclass
class Flux2SingleSubmodules:
    linear_qkv_mlp: ModuleSpec | type
    """H -> [q/k/v per head | gate | up] (diffusers to_qkv_mlp_proj), column-parallel, packed."""
    core_attention: ModuleSpec | type
    q_layernorm: ModuleSpec | type
    k_layernorm: ModuleSpec | type
    linear_proj: ModuleSpec | type
    """[attention | SwiGLU] -> H (diffusers to_out), row-parallel, packed."""


class Flux2SingleBlock(MegatronModule):
    """diffusers Flux2SingleTransformerBlock: attention and SwiGLU in parallel from one input projection, one output
    projection, modulation (shift / scale / gate) from the model's shared linear."""

    def __init__(self, config: TransformerConfig, submodules: Flux2SingleSubmodules, hidden: int, num_heads: int,
                 head_dim: int, ffn_hidden: int, eps: float = 1e-6):
        super().__init__(config)
        s = submodules
        tp = config.tensor_model_parallel_size
        inner = num_heads * head_dim
        self.head_dim, self.num_local_heads = head_dim, num_heads // tp
        self.local_sizes = (3 * inner // tp, ffn_hidden // tp, ffn_hidden // tp)
        self.linear_qkv_mlp = build_module(
            s.linear_qkv_mlp, hidden, 3 * inner + 2 * ffn_hidden, config=config, init_method=config.init_method,
            bias=False, gather_output=False, skip_bias_add=False, is_expert=False,
        )
        self.linear_qkv_mlp.weight.packed_split = (3 * inner, ffn_hidden, ffn_hidden)
        self.linear_qkv_mlp.weight.packed_names = ("qkv", "gate", "up")
        self.q_layernorm = build_module(s.q_layernorm, head_dim, config=config, eps=eps)
        self.k_layernorm = build_module(s.k_layernorm, head_dim, config=config, eps=eps)
        self.core_attention = build_module(s.core_attention, config=config)
        self.linear_proj = build_module(
            s.linear_proj, inner + ffn_hidden, hidden, config=config, init_method=config.output_layer_init_method,
            bias=False, input_is_parallel=True, skip_bias_add=False, is_expert=False,
        )
        self.linear_proj.weight.packed_split = (inner, ffn_hidden)
        self.recompute_core = config.recompute_granularity == "selective"

    def forward(self, x_SBH, mods, rope=None, perm=None):
        """`perm` (sequence parallel only): the order of the gathered joint sequence, as JointAttention's."""
        shift, scale, gate = mods
        h, _ = self.linear_qkv_mlp(modulate(layer_norm(x_SBH), shift, scale))
        qkv, g, u = h.split(self.local_sizes, dim=-1)
        qkv = qkv.view(*qkv.shape[:2], self.num_local_heads, 3, self.head_dim)
        q, k, v = qkv.unbind(3)
        q, k = self.q_layernorm(q), self.k_layernorm(k)
        if perm is not None:
            inv = torch.argsort(perm)
            q, k, v = q[inv], k[inv], v[inv]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.recompute_core and torch.is_grad_enabled():
            from megatron.core import tensor_parallel

            o = tensor_parallel.checkpoint(self.core_attention, False, q, k, v)
        else:
            o = self.core_attention(q, k, v)
        if perm is not None:
            o = o[perm]
        out, _ = self.linear_proj(torch.cat([o, F.silu(g) * u], dim=-1))
        return x_SBH + gate[None] * out


# --------------------------------------------------------------------------- the model


class Flux2ConditionEmbedder(torch.nn.Module):
    """Flux2TimestepGuidanceEmbeddings: time (+ guidance) sinusoids -> bias-free SiLU MLPs, summed. Replicated over
    TP and recomputed on every pipeline stage; time and guidance arrive already scaled (x1000)."""

    def __init__(self, hidden: int, guidance: bool, config: TransformerConfig):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, hidden, config, bias=False)
        self.guidance_embedder = MLPEmbedder(256, hidden, config, bias=False) if guidance else None
        mark_pipeline_replicated(self)

    def forward(self, t_B, guidance_B=None):
        # diffusers rounds the sinusoids' frequencies to the activation dtype and casts the embedding to it
        c = self.timestep_embedder(timestep_embedding(t_B, freq_dtype=t_B.dtype).to(t_B.dtype))
        if self.guidance_embedder is not None and guidance_B is not None:
            c = c + self.guidance_embedder(timestep_embedding(guidance_B, freq_dtype=guidance_B.dtype).to(guidance_B.dtype))
        return c


class Flux2Model(DiTBase):
    def __init__(self, config: TransformerConfig, arch: Flux2Arch, double_block: ModuleSpec, single_block: ModuleSpec,
                 adaln_linear, layout: StageLayout):
        super().__init__(config, layout)
        self.arch = arch
        H, N = arch.hidden_size, arch.num_layers
        head = dict(hidden=H, num_heads=arch.num_attention_heads, head_dim=arch.attention_head_dim,
                    ffn_hidden=arch.mlp_hidden)
        self.time_guidance_embed = Flux2ConditionEmbedder(H, arch.guidance_embeds, config)
        # shared by every block of a kind, so present on every stage (finalize_model_grads sums their grads over
        # PP, which needs the same parameters on all stages); a stage computes only the kinds it holds
        self.double_stream_modulation_img = AdaLNModulation(config, H, 6, adaln_linear, bias=False)
        self.double_stream_modulation_txt = AdaLNModulation(config, H, 6, adaln_linear, bias=False)
        self.single_stream_modulation = AdaLNModulation(config, H, 3, adaln_linear, bias=False)
        for m in (self.double_stream_modulation_img, self.double_stream_modulation_txt, self.single_stream_modulation):
            mark_pipeline_replicated(m)
        self.rope = FluxRope(arch.axes_dims_rope, theta=arch.rope_theta)
        if layout.pre_process:
            self.x_embedder = replicated_linear(arch.in_channels, H, config, bias=False)
            self.context_embedder = replicated_linear(arch.joint_attention_dim, H, config, bias=False)
        self.double_blocks = torch.nn.ModuleList(
            build_module(double_block, config=config, **head) for _ in range(layout.first, min(layout.last, N))
        )
        self.single_blocks = torch.nn.ModuleList(
            build_module(single_block, config=config, **head) for _ in range(max(layout.first, N), layout.last)
        )
        self._double_offset = layout.first
        self._single_offset = max(layout.first - N, 0)
        if layout.post_process:
            self.init_output_head(arch.out_dim, adaln_linear, bias=False)

    def block_offsets(self):
        return {"double_blocks": self._double_offset, "single_blocks": self._single_offset}

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Same inputs as diffusers' Flux2Transformer2DModel (timestep = sigma, guidance unscaled; ids [S, 4]).

        `encoder_hidden_states` is needed on every stage (its dtype and length); returns the velocity
        [B, S_img, C] on the last stage, the boundary tensor otherwise.
        """
        from ..flux.model import sp_joint_order

        cfg = self.config
        dtype = encoder_hidden_states.dtype
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        if txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        t = timestep.to(dtype) * 1000
        g = guidance.to(dtype) * 1000 if guidance is not None and self.arch.guidance_embeds else None
        c_BH = self.time_guidance_embed(t, g)
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

        with fp8_context(cfg):  # the blocks' TE linears only; embedders, modulation and proj_out stay bf16
            if len(self.double_blocks):
                m_img, m_txt = self.double_stream_modulation_img(c_BH), self.double_stream_modulation_txt(c_BH)
                for blk in self.double_blocks:
                    img, txt = maybe_checkpoint(cfg, lambda i, x, *m, b=blk: b(i, x, m[:6], m[6:], rope),
                                                img, txt, *m_img, *m_txt)
            if len(self.single_blocks):
                m_single = self.single_stream_modulation(c_BH)
                perm = sp_joint_order(num_txt, num_img, tp, img.device) if cfg.sequence_parallel else None
                x = torch.cat([txt, img])
                for blk in self.single_blocks:
                    x = maybe_checkpoint(cfg, lambda x_, *m, b=blk: b(x_, m, rope, perm), x, *m_single)
                txt, img = x[:local_txt], x[local_txt:]

        if not self.post_process:
            return torch.cat([txt, img])
        return self.output_head(img, c_BH).transpose(0, 1)


def latent_tokens(latent_BCHW: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h w, C] (Flux2Pipeline._pack_latents: the latent is already patchified)."""
    b, c, h, w = latent_BCHW.shape
    return latent_BCHW.reshape(b, c, h * w).permute(0, 2, 1)


def latent_from_tokens(tokens_BSC: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c = tokens_BSC.shape
    return tokens_BSC.permute(0, 2, 1).reshape(b, c, h, w)


def image_ids(h: int, w: int, device=None) -> torch.Tensor:
    """(t, row, column, l) = (0, r, c, 0) of every token of an h x w latent (Flux2Pipeline._prepare_latent_ids)."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], dim=-1)


def text_ids(num_tokens: int, device=None) -> torch.Tensor:
    """(0, 0, 0, l) of every text token (Flux2Pipeline._prepare_text_ids)."""
    pos = torch.arange(num_tokens, device=device)
    zeros = torch.zeros_like(pos)
    return torch.stack([zeros, zeros, zeros, pos], dim=-1)
