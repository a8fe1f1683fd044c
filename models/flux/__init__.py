"""FLUX.1 (diffusers `FluxTransformer2DModel`, `FluxPipeline`): the family in one place.

Latent space: the 16-channel VAE latent [B, 16, H/8, W/8]; the DiT reads it as 2x2 patches packed into 64-dim
tokens (`pack_latents`) with (0, row, column) RoPE ids, takes sigma (it scales by 1000 inside), and FLUX.1-dev
embeds the guidance scale. Text: T5-XXL sequence embeddings (512 tokens) and CLIP-L's pooled output.
"""
from __future__ import annotations

import math

import torch

from .. import costs as F
from ..family import Family
from ..weight_groups import attention_groups, condition_groups, linear, mlp_groups
from .arch import PRESETS, FluxArch


class Flux1Family(Family):
    name = "flux"
    arch_cls = FluxArch
    label = FluxArch.label
    presets = PRESETS
    pipelines = ("FluxPipeline",)
    default_text_length = 512  # SenseFlow's FLUX encode_prompt: T5 max_sequence_length 512
    clip_condition = "project"  # the pooled vector is CLIP-L's pooler output, before its text projection

    # ------------------------------------------------------------------ architecture
    def build(self, arch, config, backend, layout):
        from ..specs import flux_single_block_spec, mmdit_block_spec
        from .model import FluxModel

        return FluxModel(config, arch, mmdit_block_spec(backend, qk_norm=True), flux_single_block_spec(backend),
                         layout)

    def groups(self, arch):
        g = linear("x_embedder", "x_embedder") + linear("context_embedder", "context_embedder")
        g += condition_groups(arch.guidance_embeds)
        for i in range(arch.num_layers):
            o, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
            g += linear(f"{o}.adaln.linear", f"{t}.norm1.linear")
            g += linear(f"{o}.adaln_context.linear", f"{t}.norm1_context.linear")
            g += attention_groups(f"{o}.attention", f"{t}.attn", joint=True, qk_norm=True, out=True, context_out=True)
            g += mlp_groups(f"{o}.mlp", f"{t}.ff") + mlp_groups(f"{o}.mlp_context", f"{t}.ff_context")
        for i in range(arch.num_single_layers):
            o, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
            g += linear(f"{o}.adaln.linear", f"{t}.norm.linear")
            g += attention_groups(f"{o}.attention", f"{t}.attn", joint=False, qk_norm=True, out=False, context_out=False)
            g += linear(f"{o}.linear_mlp_fc1", f"{t}.proj_mlp")
            g += linear(f"{o}.linear_proj", f"{t}.proj_out")
        g += linear("norm_out.linear", "norm_out.linear") + linear("proj_out", "proj_out")
        return g

    # ------------------------------------------------------------------ interface
    def model_inputs(self, arch, x, sigma, text, pooled, guidance=None):
        from .model import image_ids, pack_latents, text_ids

        h, w = x.shape[-2:]
        kw = dict(hidden_states=pack_latents(x), encoder_hidden_states=text, pooled_projections=pooled, timestep=sigma,
                  img_ids=image_ids(h, w, x.device), txt_ids=text_ids(text.shape[1], x.device))
        if arch.guidance_embeds:
            if guidance is None:
                raise ValueError("this FLUX model embeds guidance; pass a guidance scale per sample.")
            kw["guidance"] = guidance
        return kw

    def velocity(self, arch, out, x):
        from .model import unpack_latents

        return unpack_latents(out, *x.shape[-2:])

    def image_tokens(self, arch, latent_h, latent_w):
        return (latent_h // 2) * (latent_w // 2)

    def reference_inputs(self, arch, batch, latent_hw, num_txt, g, guidance):
        from .model import image_ids, text_ids

        h, w = latent_hw
        text = torch.randn(batch, num_txt, arch.joint_attention_dim, generator=g)
        pooled = torch.randn(batch, arch.pooled_projection_dim, generator=g)
        x = torch.randn(batch, (h // 2) * (w // 2), arch.in_channels, generator=g)
        t = torch.rand(batch, generator=g)
        if not arch.guidance_embeds:
            g_B = None
        elif guidance is None:
            g_B = torch.rand(batch, generator=g) * 5
        else:
            g_B = torch.full((batch,), guidance)
        return dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                    img_ids=image_ids(h, w), txt_ids=text_ids(num_txt), guidance=g_B)

    def per_sample_keys(self):
        return ("img_ids", "txt_ids")

    # ------------------------------------------------------------------ schedule
    def default_shift(self, arch, num_image_tokens, num_steps):
        """FluxPipeline's dynamic shift: m = exp(mu), mu linear in the token count from 0.5 at 256 tokens to 1.15
        at 4096 (and beyond); the same for every number of steps."""
        return math.exp(0.5 + (1.15 - 0.5) * (num_image_tokens - 256) / (4096 - 256))

    # ------------------------------------------------------------------ costs
    def block_costs(self, arch, batch, s_img, s_txt):
        h = arch.hidden_size
        return ([F.mmdit_block(batch, s_img, s_txt, h)] * arch.num_layers
                + [F.flux_single_block(batch, s_img + s_txt, h)] * arch.num_single_layers)

    def embed_flops(self, arch, batch, s_img, s_txt):
        h = arch.hidden_size
        first = F.linear(batch * s_img, arch.in_channels, h) + F.linear(batch * s_txt, arch.joint_attention_dim, h)
        return first + F.condition_flops(batch, h, arch.pooled_projection_dim, arch.guidance_embeds), \
            F.output_flops(batch, s_img, h, arch.out_dim)

    def block_params(self, arch):
        h, d = arch.hidden_size, arch.attention_head_dim
        lin = F.linear_params
        ff_split = lin(h, 4 * h) + 4 * h * h  # fc1 (column) + fc2 weight (row)
        double = (2 * lin(h, 6 * h) + 6 * lin(h, h) + 2 * h * h + 2 * ff_split,
                  4 * d + 2 * h + 2 * h)  # q/k norms of both streams; out-proj and fc2 biases of both
        single = (lin(h, 3 * h) + 3 * lin(h, h) + lin(h, 4 * h) + 5 * h * h, 2 * d + h)
        return [double] * arch.num_layers + [single] * arch.num_single_layers

    def embedder_params(self, arch):
        h, lin = arch.hidden_size, F.linear_params
        return (lin(arch.in_channels, h) + lin(arch.joint_attention_dim, h)
                + F.condition_params(h, arch.pooled_projection_dim, arch.guidance_embeds)
                + lin(h, 2 * h) + lin(h, arch.out_dim))

    def block_lora_linears(self, arch, index):
        h = arch.hidden_size
        qkv, proj = ("qkv", "column", h, 3 * h, 3), ("proj", "row", h, h, 1)
        fc1, fc2 = ("mlp", "column", h, 4 * h, 1), ("mlp", "row", 4 * h, h, 1)
        if index < arch.num_layers:
            return [qkv, qkv, proj, proj, fc1, fc2, fc1, fc2]
        return [qkv, fc1, ("proj", "row", 5 * h, h, 1)]

    def block_kinds(self, arch, index):
        return ["joint"] if index < arch.num_layers else ["single"]

    def with_depth(self, arch, double, single=0, dual=0):
        import dataclasses

        return dataclasses.replace(arch, num_layers=double, num_single_layers=single)

    def block_counts(self, arch):
        return arch.num_layers, arch.num_single_layers, 0

    # ------------------------------------------------------------------ encoders
    def text_encoder(self, pipeline_dir, max_length=None, device="cpu", dtype=torch.float32, clip=None):
        from .text import FluxTextEncoder

        return FluxTextEncoder.from_pretrained(pipeline_dir, max_length or self.default_text_length, device, dtype)

    def vae(self, vae_dir, dtype=torch.float32, device="cpu"):
        from ..vae import KLCodec

        return KLCodec.from_pretrained(vae_dir, dtype, device)

    # ------------------------------------------------------------------ export
    single_file = "Black Forest Labs' flux1-dev.safetensors layout"

    def single_file_recipe(self, keys):
        from .single_file import recipe

        return recipe(keys)


FAMILY = Flux1Family()
