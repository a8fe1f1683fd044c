"""Building blocks shared by the FLUX and SD3 DiTs, written against megatron-core.

Tensor legend: S sequence, B batch, H hidden, N heads on this TP rank, D head dim.
Inside the models activations are Megatron-layout `x_SBH`; per-sample
conditioning vectors are `c_BH`.

Which submodule is tensor-parallel, and how, is decided by the layer spec
(`models/specs.py`), never by branches here. The few layers that stay
replicated under TP say why where they are built.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import mappings
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

# --------------------------------------------------------------------------- helpers


def zeros_init(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.init.zeros_(t)


def no_sp(config: TransformerConfig) -> TransformerConfig:
    """The same config without sequence parallel, for layers whose input is per sample, not per token."""
    if not config.sequence_parallel:
        return config
    return dataclasses.replace(config, sequence_parallel=False)


def mark_pipeline_replicated(module: torch.nn.Module) -> None:
    """Params present on every pipeline stage: megatron's finalize_model_grads sums their
    grads over the PP group (config.has_cond_embedder), and checkpoints save one copy."""
    for p in module.parameters():
        p.pipeline_parallel = True


def replicated_linear(in_features: int, out_features: int, config: TransformerConfig, bias: bool = True) -> torch.nn.Linear:
    lin = torch.nn.Linear(in_features, out_features, bias=bias, dtype=config.params_dtype)
    return lin


# --------------------------------------------------------------------------- embeddings


def timestep_embedding(t_B: torch.Tensor, dim: int = 256, max_period: float = 10000.0, scale: float = 1.0,
                       freq_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sinusoidal embedding, cos first (diffusers Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0, scale)).
    `scale` multiplies the angles after the frequencies, as diffusers does (Qwen-Image passes sigma with scale
    1000; FLUX scales the timestep itself before); `freq_dtype` rounds the frequencies first, as diffusers does
    to the timestep's dtype."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half
    freqs = torch.exp(exponent) if freq_dtype is None else torch.exp(exponent).to(freq_dtype)
    args = t_B[:, None].float() * freqs[None, :]
    if scale != 1.0:
        args = scale * args
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(torch.nn.Module):
    """linear -> SiLU -> linear (diffusers TimestepEmbedding / PixArtAlphaTextProjection with act silu)."""

    def __init__(self, in_features: int, hidden: int, config: TransformerConfig, bias: bool = True):
        super().__init__()
        self.linear_1 = replicated_linear(in_features, hidden, config, bias)
        self.linear_2 = replicated_linear(hidden, hidden, config, bias)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ConditionEmbedder(torch.nn.Module):
    """Time (+ guidance) + pooled-text conditioning vector c_BH.

    Recomputed on every pipeline stage (it is small, and sending it would need
    a second boundary tensor); replicated over TP because it is per sample.
    Time and guidance arrive already scaled (x1000) by the model.
    """

    def __init__(self, hidden: int, pooled_dim: int, guidance: bool, config: TransformerConfig):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, hidden, config)
        self.guidance_embedder = MLPEmbedder(256, hidden, config) if guidance else None
        self.text_embedder = MLPEmbedder(pooled_dim, hidden, config)
        mark_pipeline_replicated(self)

    def forward(self, timestep_B, pooled_BP, guidance_B=None):
        dtype = pooled_BP.dtype
        c = self.timestep_embedder(timestep_embedding(timestep_B).to(dtype))
        if self.guidance_embedder is not None:
            if guidance_B is None:
                raise ValueError("this model embeds a guidance scale; pass `guidance`.")
            c = c + self.guidance_embedder(timestep_embedding(guidance_B).to(dtype))
        return c + self.text_embedder(pooled_BP)


class FluxRope(torch.nn.Module):
    """3-axis RoPE over (text, row, column) ids; cos/sin tables of shape [S, D] in fp32."""

    def __init__(self, axes_dim: tuple[int, ...], theta: float = 10000.0):
        super().__init__()
        self.axes_dim = tuple(axes_dim)
        self.theta = theta

    def forward(self, ids_S3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float64 frequencies as in diffusers / BFL's reference (fp32 loses the high axes)
        dtype = torch.float64 if ids_S3.device.type != "mps" else torch.float32
        pos = ids_S3.to(dtype)
        cos, sin = [], []
        for i, d in enumerate(self.axes_dim):
            freqs = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=dtype, device=ids_S3.device) / d))
            f = torch.outer(pos[:, i], freqs)
            cos.append(f.cos().repeat_interleave(2, dim=1).float())
            sin.append(f.sin().repeat_interleave(2, dim=1).float())
        return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def apply_rope(x_SBND: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved (real, imag) pairs, as diffusers' apply_rotary_emb(use_real_unbind_dim=-1)."""
    x_re, x_im = x_SBND.reshape(*x_SBND.shape[:-1], -1, 2).unbind(-1)
    x_rot = torch.stack([-x_im, x_re], dim=-1).flatten(-2)
    cos, sin = cos_SD[:, None, None, :], sin_SD[:, None, None, :]
    return (x_SBND.float() * cos + x_rot.float() * sin).to(x_SBND.dtype)


# --------------------------------------------------------------------------- norms


class HeadRMSNorm(torch.nn.Module):
    """RMSNorm over head_dim with a learned scale (QK-norm).

    Replicated under TP: it acts on head_dim after the heads are split, so each
    rank needs the whole vector; its grads are partial per rank and summed over
    TP by megatron's finalize_model_grads, which matches it by the names
    `q_layernorm` / `k_layernorm` (config.qk_layernorm=True).
    """

    def __init__(self, dim: int, config: TransformerConfig, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim, dtype=config.params_dtype))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Parameter-free LayerNorm of the adaLN blocks (elementwise_affine=False)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def modulate(x_SBH, shift_BH, scale_BH):
    return x_SBH * (1 + scale_BH[None]) + shift_BH[None]


class AdaLNModulation(MegatronModule):
    """SiLU -> linear(H, k*H) -> k chunks of per-sample modulation (shift/scale/gate...).

    Column-parallel with gathered output: the weights are k*H x H per block (the
    largest single tensors of FLUX after the MLPs), so TP shards them; every
    rank needs all k*H outputs because modulation indexes the full hidden dim.
    Zero-initialised (adaLN-Zero) so a fresh model starts as the identity.

    Under sequence parallel each rank modulates only its own tokens, so the
    gradient reaching these per-sample outputs is a partial sum; `sharded_tokens`
    all-reduces it over TP before the column-parallel backward splits it.
    """

    def __init__(
        self, config: TransformerConfig, hidden: int, num_chunks: int, linear: ModuleSpec | type,
        sharded_tokens: bool | None = None, bias: bool = True,
    ):
        super().__init__(config)
        self.num_chunks = num_chunks
        self.sharded_tokens = config.sequence_parallel if sharded_tokens is None else sharded_tokens
        self.linear = build_module(
            linear,
            hidden,
            num_chunks * hidden,
            config=no_sp(config),
            init_method=zeros_init,
            bias=bias,
            gather_output=True,
            skip_bias_add=False,
        )

    def forward(self, c_BH):
        out, _ = self.linear(F.silu(c_BH))
        if self.sharded_tokens:
            out = mappings.copy_to_tensor_model_parallel_region(out)
        return out.chunk(self.num_chunks, dim=-1)


# --------------------------------------------------------------------------- attention


def sdpa(q_SBND, k_SBND, v_SBND, mask_BS=None):
    """softmax(QK^T / sqrt(D)) V with torch SDPA; `mask_BS` (bool, True = attend) hides padded keys."""
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q_SBND, k_SBND, v_SBND))
    if mask_BS is None:  # the plain call (memory_probe substitutes the fused kernels' saving pattern for it)
        o_BNSD = F.scaled_dot_product_attention(q, k, v)
    else:
        o_BNSD = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BS[:, None, None, :])
    o = o_BNSD.permute(2, 0, 1, 3)
    return o.reshape(o.shape[0], o.shape[1], -1)


class SDPAttention(torch.nn.Module):
    """Non-causal attention core on q/k/v_SBND with torch SDPA (the `local` spec)."""

    def __init__(self, config: TransformerConfig, **kwargs):
        super().__init__()

    def forward(self, q_SBND, k_SBND, v_SBND, mask_BS=None):
        return sdpa(q_SBND, k_SBND, v_SBND, mask_BS)


@dataclass
class AttentionSubmodules:
    linear_qkv: ModuleSpec | type
    """Fused QKV of the image (or joint) stream; weight rows interleaved per head [q_h, k_h, v_h]."""
    core_attention: ModuleSpec | type
    """softmax(QK^T/sqrt(D))V on this rank's heads."""
    q_layernorm: ModuleSpec | type | None = None
    k_layernorm: ModuleSpec | type | None = None
    linear_proj: ModuleSpec | type | None = None
    """Output projection; None when the block projects attention and MLP together (FLUX single block)."""
    linear_added_qkv: ModuleSpec | type | None = None
    """Fused QKV of the text stream (MMDiT joint attention)."""
    added_q_layernorm: ModuleSpec | type | None = None
    added_k_layernorm: ModuleSpec | type | None = None
    linear_added_proj: ModuleSpec | type | None = None
    """Text-stream output projection; None for SD3's last (context pre-only) block."""


class JointAttention(MegatronModule):
    """MMDiT attention: image and (optional) text streams with their own projections,
    one softmax over the joint sequence [text; image].

    Heads are split over TP by the column-parallel QKV (its rows are laid out
    per head, so a contiguous TP chunk is a set of whole heads).
    """

    def __init__(self, config: TransformerConfig, submodules: AttentionSubmodules, hidden: int, num_heads: int, head_dim: int,
                 bias: bool = True, eps: float = 1e-6):
        super().__init__(config)
        tp = config.tensor_model_parallel_size
        self.head_dim = head_dim
        self.num_local_heads = num_heads // tp
        inner = num_heads * head_dim

        def col(spec):
            return build_module(
                spec, hidden, 3 * inner, config=config, init_method=config.init_method, bias=bias,
                gather_output=False, skip_bias_add=False, is_expert=False,
            )

        def row(spec):
            return build_module(
                spec, inner, hidden, config=config, init_method=config.output_layer_init_method, bias=bias,
                input_is_parallel=True, skip_bias_add=False, is_expert=False,
            )

        def norm(spec):
            return build_module(spec, head_dim, config=config, eps=eps) if spec is not None else None

        s = submodules
        self.linear_qkv = col(s.linear_qkv)
        self.q_layernorm, self.k_layernorm = norm(s.q_layernorm), norm(s.k_layernorm)
        self.linear_proj = row(s.linear_proj) if s.linear_proj is not None else None
        self.linear_added_qkv = col(s.linear_added_qkv) if s.linear_added_qkv is not None else None
        self.added_q_layernorm, self.added_k_layernorm = norm(s.added_q_layernorm), norm(s.added_k_layernorm)
        self.linear_added_proj = row(s.linear_added_proj) if s.linear_added_proj is not None else None
        self.core_attention = build_module(s.core_attention, config=config)
        self.recompute_core = config.recompute_granularity == "selective"

    def _qkv(self, linear, q_norm, k_norm, x_SBH):
        qkv, _ = linear(x_SBH)
        qkv = qkv.view(*qkv.shape[:2], self.num_local_heads, 3, self.head_dim)
        q, k, v = qkv.unbind(3)
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        return q, k, v

    def _core(self, q, k, v, mask=None):
        if mask is None:  # no key mask: the attention core's own calling convention (TE's too)
            if self.recompute_core and torch.is_grad_enabled():
                return tensor_parallel.checkpoint(self.core_attention, False, q, k, v)
            return self.core_attention(q, k, v)
        if self.recompute_core and torch.is_grad_enabled():
            return tensor_parallel.checkpoint(self.core_attention, False, q, k, v, mask)
        return self.core_attention(q, k, v, mask)

    def forward(self, x_SBH, ctx_SBH=None, rope=None, perm=None, mask=None):
        """Returns (image/joint output, text output or None).

        `perm` (sequence parallel only): the order in which the gathered joint
        sequence arrives; q/k/v are put back in natural order for RoPE and the
        output returned in the gathered order, which the row-parallel
        reduce-scatter maps back to this rank's tokens. `mask` [B, S] (bool, True =
        attend, natural order of the joint sequence) hides padded text tokens as keys.
        """
        q, k, v = self._qkv(self.linear_qkv, self.q_layernorm, self.k_layernorm, x_SBH)
        num_ctx = 0
        if ctx_SBH is not None:
            cq, ck, cv = self._qkv(self.linear_added_qkv, self.added_q_layernorm, self.added_k_layernorm, ctx_SBH)
            num_ctx = cq.shape[0]
            q, k, v = torch.cat([cq, q]), torch.cat([ck, k]), torch.cat([cv, v])
        if perm is not None:
            inv = torch.argsort(perm)
            q, k, v = q[inv], k[inv], v[inv]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = self._core(q, k, v, mask)
        if perm is not None:
            o = o[perm]
        ctx_out = None
        if ctx_SBH is not None:
            ctx_o, o = o[:num_ctx], o[num_ctx:]
            if self.linear_added_proj is not None:
                ctx_out, _ = self.linear_added_proj(ctx_o.contiguous())
        if self.linear_proj is not None:
            o, _ = self.linear_proj(o.contiguous())
        return o, ctx_out


# --------------------------------------------------------------------------- MLP


@dataclass
class MLPSubmodules:
    linear_fc1: ModuleSpec | type
    """H -> 4H, column-parallel."""
    linear_fc2: ModuleSpec | type
    """4H -> H, row-parallel."""


class MLP(MegatronModule):
    """Feed-forward with tanh-GELU (diffusers FeedForward(activation_fn='gelu-approximate'))."""

    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules, hidden: int, ffn_hidden: int):
        super().__init__(config)
        self.linear_fc1 = build_module(
            submodules.linear_fc1, hidden, ffn_hidden, config=config, init_method=config.init_method, bias=True,
            gather_output=False, skip_bias_add=False, is_expert=False,
        )
        self.linear_fc2 = build_module(
            submodules.linear_fc2, ffn_hidden, hidden, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False, is_expert=False,
        )

    def forward(self, x_SBH):
        h, _ = self.linear_fc1(x_SBH)
        out, _ = self.linear_fc2(F.gelu(h, approximate="tanh"))
        return out


# --------------------------------------------------------------------------- recompute


def maybe_checkpoint(config: TransformerConfig, fn: Callable, *tensors):
    """Full activation recompute of one block when config asks for it (grad mode only)."""
    if config.recompute_granularity == "full" and torch.is_grad_enabled():
        if not any(t.requires_grad for t in tensors if t is not None):
            # A frozen base with LoRA adapters: nothing before the first block is trainable, so no input of the
            # block needs a gradient, and megatron's (reentrant) checkpoint would return an output without a
            # graph: the adapters inside would never see their backward. A leaf that asks for a gradient keeps
            # the graph; the extra input gradient is one block's worth, once per forward. Models whose
            # embedders train (every full fine-tuning run) never take this branch.
            tensors = (tensors[0].detach().requires_grad_(True), *tensors[1:])
        if config.fp8:
            # TE's checkpoint replays the FP8 scaling state of the first pass in the
            # recompute; the plain one would update delayed-scaling amaxes twice
            from megatron.core import parallel_state as ps
            from megatron.core.extensions.transformer_engine import te_checkpoint

            return te_checkpoint(fn, False, tensor_parallel.random.get_cuda_rng_tracker,
                                 ps.get_tensor_model_parallel_group(), *tensors)
        return tensor_parallel.checkpoint(fn, False, *tensors)
    return fn(*tensors)


def fp8_context(config: TransformerConfig):
    """FP8 autocast for a stage's blocks when the role's config asks for FP8 (megatron-core's
    helper: recipe, format and amax-reduction group all come from the config); a null
    context otherwise, and always on the local spec, which refuses FP8 earlier."""
    if not config.fp8:
        from contextlib import nullcontext

        return nullcontext()
    from megatron.core.fp8_utils import get_fp8_context

    return get_fp8_context(config)


def sp_scatter(x_SBH, config):
    return mappings.scatter_to_sequence_parallel_region(x_SBH) if config.sequence_parallel else x_SBH


def sp_gather(x_SBH, config):
    if config.sequence_parallel:
        return mappings.gather_from_sequence_parallel_region(x_SBH, tensor_parallel_output_grad=False)
    return x_SBH
