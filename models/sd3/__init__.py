"""SD3 / SD3.5 (diffusers `SD3Transformer2DModel`, `StableDiffusion3Pipeline`): the family in one place.

Latent space: the 16-channel VAE latent [B, 16, H/8, W/8], patchified by the model's own conv; the timestep is
diffusers' 1000 sigma; no guidance input (real CFG against the empty prompt). Text: CLIP-L and CLIP-G penultimate
states padded to T5's width and followed by T5 (77 + 77 tokens here), and both CLIP projections pooled (2048, the
first 768 being CLIP-L's projected text embedding).
"""
from __future__ import annotations

import torch

from .. import costs as F
from ..family import Family
from ..weight_groups import Group, attention_groups, condition_groups, linear, mlp_groups
from .arch import PRESETS, SD3Arch


class SD3Family(Family):
    name = "sd3"
    arch_cls = SD3Arch
    label = SD3Arch.label
    presets = PRESETS
    pipelines = ("StableDiffusion3Pipeline",)
    # the distillation trainers' prompt length: SenseFlow's SD3.5 and SiD-DiT's SD3 encode T5 with max_length 77
    # after 77 CLIP tokens (diffusers' own default is 256 T5 tokens)
    default_text_length = 77 + 77

    # ------------------------------------------------------------------ architecture
    def build(self, arch, config, backend, layout):
        from ..specs import mmdit_block_spec
        from .model import SD3Model

        def block_spec(i: int):
            return mmdit_block_spec(backend, qk_norm=arch.qk_norm is not None, context_pre_only=i == arch.num_layers - 1,
                                    dual_attention=i in arch.dual_attention_layers)

        return SD3Model(config, arch, block_spec, layout)

    def groups(self, arch):
        qk = arch.qk_norm is not None
        g = linear("pos_embed.proj", "pos_embed.proj") + [Group("pos_embed.pos_embed", ("pos_embed.pos_embed",))]
        g += linear("context_embedder", "context_embedder") + condition_groups(False)
        for i in range(arch.num_layers):
            o, t = f"joint_blocks.{i}", f"transformer_blocks.{i}"
            pre_only = i == arch.num_layers - 1
            g += linear(f"{o}.adaln.linear", f"{t}.norm1.linear")
            g += linear(f"{o}.adaln_context.linear", f"{t}.norm1_context.linear")
            g += attention_groups(f"{o}.attention", f"{t}.attn", joint=True, qk_norm=qk, out=True, context_out=not pre_only)
            if i in arch.dual_attention_layers:
                g += attention_groups(f"{o}.attention2", f"{t}.attn2", joint=False, qk_norm=qk, out=True,
                                      context_out=False)
            g += mlp_groups(f"{o}.mlp", f"{t}.ff")
            if not pre_only:
                g += mlp_groups(f"{o}.mlp_context", f"{t}.ff_context")
        g += linear("norm_out.linear", "norm_out.linear") + linear("proj_out", "proj_out")
        return g

    # ------------------------------------------------------------------ interface
    def model_inputs(self, arch, x, sigma, text, pooled, guidance=None):
        # SD3.x takes the timestep on diffusers' 0..1000 scale; later pipeline stages need the text length
        return dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=sigma * 1000,
                    num_txt=text.shape[1])

    def velocity(self, arch, out, x):
        return out

    def image_tokens(self, arch, latent_h, latent_w):
        p = arch.patch_size
        return (latent_h // p) * (latent_w // p)

    def reference_inputs(self, arch, batch, latent_hw, num_txt, g, guidance):
        h, w = latent_hw
        text = torch.randn(batch, num_txt, arch.joint_attention_dim, generator=g)
        pooled = torch.randn(batch, arch.pooled_projection_dim, generator=g)
        x = torch.randn(batch, arch.in_channels, h, w, generator=g)
        return dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                    timestep=torch.rand(batch, generator=g) * 1000)

    def our_inputs(self, arch, reference, num_txt):
        return {**reference, "num_txt": num_txt}

    # ------------------------------------------------------------------ schedule
    def default_shift(self, arch, num_image_tokens, num_steps):
        return 3.0  # StableDiffusion3Pipeline's scheduler: shift 3, no dynamic shifting

    # ------------------------------------------------------------------ costs
    def block_costs(self, arch, batch, s_img, s_txt):
        return [F.mmdit_block(batch, s_img, s_txt, arch.hidden_size, context_pre_only=i == arch.num_layers - 1,
                              dual=i in arch.dual_attention_layers) for i in range(arch.num_layers)]

    def embed_flops(self, arch, batch, s_img, s_txt):
        h = arch.hidden_size
        first = (F.linear(batch * s_img, arch.in_channels * arch.patch_size**2, h)
                 + F.linear(batch * s_txt, arch.joint_attention_dim, h))
        return first + F.condition_flops(batch, h, arch.pooled_projection_dim), \
            F.output_flops(batch, s_img, h, arch.out_dim)

    def block_params(self, arch):
        h, d, lin = arch.hidden_size, arch.attention_head_dim, F.linear_params
        ff_split = lin(h, 4 * h) + 4 * h * h  # fc1 (column) + fc2 weight (row)
        norms = 2 * d if arch.qk_norm else 0
        out = []
        for i in range(arch.num_layers):
            pre_only = i == arch.num_layers - 1
            dual = i in arch.dual_attention_layers
            split = lin(h, (9 if dual else 6) * h) + lin(h, (2 if pre_only else 6) * h)
            split += 6 * lin(h, h) + h * h + ff_split  # QKV of both streams, image out-proj, image MLP
            rep = 2 * norms + h + h  # image out-proj and fc2 biases
            if not pre_only:
                split += h * h + ff_split
                rep += h + h
            if dual:
                split += 3 * lin(h, h) + h * h
                rep += norms + h
            out.append((split, rep))
        return out

    def embedder_params(self, arch):
        h, p, lin = arch.hidden_size, arch.patch_size, F.linear_params
        return (arch.in_channels * p * p * h + h + lin(arch.joint_attention_dim, h)
                + F.condition_params(h, arch.pooled_projection_dim) + lin(h, 2 * h) + lin(h, p * p * arch.out_channels))

    def block_lora_linears(self, arch, index):
        h = arch.hidden_size
        qkv, proj = ("qkv", "column", h, 3 * h, 3), ("proj", "row", h, h, 1)
        fc1, fc2 = ("mlp", "column", h, 4 * h, 1), ("mlp", "row", 4 * h, h, 1)
        pre_only = index == arch.num_layers - 1
        out = [qkv, qkv, proj, fc1, fc2] + ([] if pre_only else [proj, fc1, fc2])
        if index in arch.dual_attention_layers:
            out += [qkv, proj]
        return out

    def block_kinds(self, arch, index):
        return ["joint", "dual"] if index in (arch.dual_attention_layers or ()) else ["joint"]

    def with_depth(self, arch, double, single=0, dual=0):
        import dataclasses

        # SD3.5 Medium (MMDiT-X): the first `dual` blocks have the second attention
        return dataclasses.replace(arch, num_layers=double, dual_attention_layers=tuple(range(dual))
                                   if arch.dual_attention_layers else ())

    def block_counts(self, arch):
        return arch.num_layers, 0, len(arch.dual_attention_layers or ())

    # ------------------------------------------------------------------ encoders
    def text_encoder(self, pipeline_dir, max_length=None, device="cpu", dtype=torch.float32, clip=None):
        from .text import SD3TextEncoder

        return SD3TextEncoder.from_pretrained(pipeline_dir, max_length or self.default_text_length, device, dtype)

    def vae(self, vae_dir, dtype=torch.float32, device="cpu"):
        from ..vae import KLCodec

        return KLCodec.from_pretrained(vae_dir, dtype, device)

    # ------------------------------------------------------------------ export
    single_file = "Stability AI's single-file layout (sd3.5_large.safetensors: model.diffusion_model.*)"

    def single_file_recipe(self, keys):
        from .single_file import recipe

        return recipe(keys)

    def sampling_call(self, arch, anchors_unshifted):
        # StableDiffusion3Pipeline's default 4 steps are linspace(1000, 1, 4) shifted ([1, 0.858, 0.602, 0.009]),
        # and no scheduler config gives linspace(1, 1/K, K) while the timestep stays 1000 sigma: pass the sigmas
        sig = ", ".join(f"{s:g}" for s in anchors_unshifted)
        return (f"StableDiffusion3Pipeline.from_pretrained(DIR)(prompt, num_inference_steps={len(anchors_unshifted)}, "
                f"sigmas=[{sig}], guidance_scale=1.0)")


FAMILY = SD3Family()
