"""FLUX.2 (diffusers `Flux2Transformer2DModel`; `Flux2Pipeline` for dev, `Flux2KleinPipeline` for klein): the family
in one place.

Latent space: the VAE's 32-channel latent patchified 2 x 2 and normalised by the VAE's batch-norm statistics, as
the pipeline holds it: [B, 128, H/16, W/16]; the DiT reads it token by token with (0, row, column, 0) RoPE ids,
takes sigma (scaled by 1000 inside), and dev embeds the guidance scale while klein is CFG-guided. Text: three
hidden layers of the text model stacked per token (dev: Mistral-Small 3.1 layers 10, 20, 30 of its chat-formatted
prompt; klein: Qwen3 layers 9, 18, 27), padded to 512 tokens and attended unmasked, as the pipelines do. The
pooled vector every batch carries is CLIP ViT-L/14's text embedding, computed at encode time for the
discriminator (the DiT reads none).
"""
from __future__ import annotations

import math

import torch

from .. import costs as F
from ..family import Family
from ..weight_groups import Group, attention_groups, condition_groups, linear, mlp_groups
from .arch import PRESETS, Flux2Arch


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """Flux2Pipeline's compute_empirical_mu: the log-shift for this many tokens and sampling steps."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


class Flux2Family(Family):
    name = "flux2"
    arch_cls = Flux2Arch
    label = Flux2Arch.label
    presets = PRESETS
    pipelines = ("Flux2KleinPipeline", "Flux2Pipeline")
    default_text_length = 512  # both pipelines' max_sequence_length
    clip_at_encode = True

    # ------------------------------------------------------------------ architecture
    def block_specs(self, backend):
        from megatron.core.transformer.spec_utils import ModuleSpec

        from ..specs import attention_spec
        from .model import (Flux2DoubleBlock, Flux2DoubleSubmodules, Flux2SingleBlock, Flux2SingleSubmodules,
                            SwiGLUMLP, SwiGLUSubmodules)

        def swiglu():
            return ModuleSpec(module=SwiGLUMLP, submodules=SwiGLUSubmodules(backend.column, backend.row))

        double = ModuleSpec(module=Flux2DoubleBlock, submodules=Flux2DoubleSubmodules(
            attention=attention_spec(backend, joint=True, qk_norm=True, bias=False), mlp=swiglu(),
            mlp_context=swiglu()))
        single = ModuleSpec(module=Flux2SingleBlock, submodules=Flux2SingleSubmodules(
            linear_qkv_mlp=backend.column, core_attention=backend.core_attention, q_layernorm=backend.qk_norm,
            k_layernorm=backend.qk_norm, linear_proj=backend.row))
        return double, single

    def build(self, arch, config, backend, layout):
        from .model import Flux2Model

        double, single = self.block_specs(backend)
        return Flux2Model(config, arch, double, single, backend.adaln_linear, layout)

    def groups(self, arch):
        g = linear("x_embedder", "x_embedder", False) + linear("context_embedder", "context_embedder", False)
        g += condition_groups(arch.guidance_embeds, pooled=False, prefix="time_guidance_embed", bias=False)
        for name in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
            g += linear(f"{name}.linear", f"{name}.linear", False)
        for i in range(arch.num_layers):
            o, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
            g += attention_groups(f"{o}.attention", f"{t}.attn", joint=True, qk_norm=True, out=True, context_out=True,
                                  bias=False)
            g += mlp_groups(f"{o}.mlp", f"{t}.ff", "linear_in", "linear_out", bias=False)
            g += mlp_groups(f"{o}.mlp_context", f"{t}.ff_context", "linear_in", "linear_out", bias=False)
        for i in range(arch.num_single_layers):
            o, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
            g += [Group(f"{o}.linear_qkv_mlp.weight", (f"{t}.attn.to_qkv_mlp_proj.weight",), "qkv_rows")]
            g += [Group(f"{o}.q_layernorm.weight", (f"{t}.attn.norm_q.weight",))]
            g += [Group(f"{o}.k_layernorm.weight", (f"{t}.attn.norm_k.weight",))]
            g += linear(f"{o}.linear_proj", f"{t}.attn.to_out", False)
        g += linear("norm_out.linear", "norm_out.linear", False) + linear("proj_out", "proj_out", False)
        return g

    # ------------------------------------------------------------------ interface
    def model_inputs(self, arch, x, sigma, text, pooled, guidance=None):
        from .model import image_ids, latent_tokens, text_ids

        h, w = x.shape[-2:]
        kw = dict(hidden_states=latent_tokens(x), encoder_hidden_states=text, timestep=sigma,
                  img_ids=image_ids(h, w, x.device), txt_ids=text_ids(text.shape[1], x.device))
        if arch.guidance_embeds:
            if guidance is None:
                raise ValueError("this FLUX.2 model embeds guidance; pass a guidance scale per sample.")
            kw["guidance"] = guidance
        return kw

    def velocity(self, arch, out, x):
        from .model import latent_from_tokens

        return latent_from_tokens(out, *x.shape[-2:])

    def image_tokens(self, arch, latent_h, latent_w):
        return latent_h * latent_w

    def reference_inputs(self, arch, batch, latent_hw, num_txt, g, guidance):
        from .model import image_ids, text_ids

        h, w = latent_hw
        text = torch.randn(batch, num_txt, arch.joint_attention_dim, generator=g)
        x = torch.randn(batch, h * w, arch.in_channels, generator=g)
        t = torch.rand(batch, generator=g)
        if not arch.guidance_embeds:
            g_B = None
        elif guidance is None:
            g_B = torch.rand(batch, generator=g) * 5
        else:
            g_B = torch.full((batch,), guidance)
        return dict(hidden_states=x, encoder_hidden_states=text, timestep=t, img_ids=image_ids(h, w),
                    txt_ids=text_ids(num_txt), guidance=g_B)

    def per_sample_keys(self):
        return ("img_ids", "txt_ids")

    # ------------------------------------------------------------------ schedule
    def default_shift(self, arch, num_image_tokens, num_steps):
        """Flux2Pipeline's empirical shift, which depends on the number of sampling steps as well as the tokens:
        m = exp(mu(tokens, steps)); 9.89 for 4 steps at 1024 px (4096 tokens), 7.56 for the teacher's 50."""
        return math.exp(empirical_mu(num_image_tokens, num_steps))

    # ------------------------------------------------------------------ costs
    def block_costs(self, arch, batch, s_img, s_txt):
        h, m = arch.hidden_size, arch.mlp_hidden
        return ([F.mmdit_block(batch, s_img, s_txt, h, ffn=m, ffn_in=2 * m, adaln=False)] * arch.num_layers
                + [F.flux_single_block(batch, s_img + s_txt, h, ffn=m, ffn_in=2 * m, adaln=False)]
                * arch.num_single_layers)

    def embed_flops(self, arch, batch, s_img, s_txt):
        h = arch.hidden_size
        first = F.linear(batch * s_img, arch.in_channels, h) + F.linear(batch * s_txt, arch.joint_attention_dim, h)
        shared = F.linear(batch, h, 6 * h) * 2 + F.linear(batch, h, 3 * h)  # the stream modulations
        return first + F.condition_flops(batch, h, 0, arch.guidance_embeds) + shared, \
            F.output_flops(batch, s_img, h, arch.out_dim)

    def block_params(self, arch):
        h, d, m = arch.hidden_size, arch.attention_head_dim, arch.mlp_hidden
        # per stream: QKV 3h^2, out h^2, SwiGLU in 2m h, out m h; all split over TP; no biases
        double = (2 * (3 * h * h + h * h + 2 * m * h + m * h), 4 * d)
        single = ((3 * h + 2 * m) * h + (h + m) * h, 2 * d)
        return [double] * arch.num_layers + [single] * arch.num_single_layers

    def embedder_params(self, arch):
        h = arch.hidden_size
        return (arch.in_channels * h + arch.joint_attention_dim * h
                + F.condition_params(h, 0, arch.guidance_embeds, bias=False)
                + 15 * h * h  # the shared modulations: 6h + 6h + 3h outputs
                + 2 * h * h + h * arch.out_dim)

    def embedder_split_params(self, arch):
        return 15 * arch.hidden_size ** 2  # the shared modulations are column-parallel (models/flux2/model.py)

    def block_lora_linears(self, arch, index):
        h, m = arch.hidden_size, arch.mlp_hidden
        if index < arch.num_layers:
            qkv, proj = ("qkv", "column", h, 3 * h, 3), ("proj", "row", h, h, 1)
            fc1, fc2 = ("mlp", "column", h, 2 * m, 1), ("mlp", "row", m, h, 1)
            return [qkv, qkv, proj, proj, fc1, fc2, fc1, fc2]
        # the single block's fused [q; k; v; gate; up] projection is one linear (one adapter, target qkv)
        return [("qkv", "column", h, 3 * h + 2 * m, 1), ("proj", "row", h + m, h, 1)]

    def block_kinds(self, arch, index):
        return ["flux2_double"] if index < arch.num_layers else ["flux2_single"]

    def with_depth(self, arch, double, single=0, dual=0):
        import dataclasses

        return dataclasses.replace(arch, num_layers=double, num_single_layers=single)

    def block_counts(self, arch):
        return arch.num_layers, arch.num_single_layers, 0

    # ------------------------------------------------------------------ encoders
    def text_encoder(self, pipeline_dir, max_length=None, device="cpu", dtype=torch.float32, clip=None):
        from .text import Flux2TextEncoder

        return Flux2TextEncoder.from_pretrained(pipeline_dir, max_length or self.default_text_length, device, dtype,
                                                clip)

    def vae(self, vae_dir, dtype=torch.float32, device="cpu"):
        from .vae import Flux2VAE

        return Flux2VAE.from_pretrained(vae_dir, dtype, device)

    def vae_factor(self, vae_dir=None):
        from ..vae import read_config

        cfg = read_config(vae_dir) if vae_dir else {}
        levels = len(cfg.get("block_out_channels", (128, 256, 512, 512)))
        return 2 ** (levels - 1) * cfg.get("patch_size", (2, 2))[0]  # the VAE's 8x, then the 2 x 2 patchify

    # ------------------------------------------------------------------ export
    def pipeline_overrides(self, arch, model_index):
        if model_index.get("_class_name") == "Flux2KleinPipeline":
            # the student takes no CFG: a distilled klein pipeline's default call runs it once per step
            return {"model_index.json": {"is_distilled": True}}
        return {}


FAMILY = Flux2Family()
