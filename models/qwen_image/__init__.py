"""Qwen-Image (diffusers `QwenImageTransformer2DModel`, `QwenImagePipeline`): the family in one place.

Latent space: the 16-channel latent of its VAE (AutoencoderKLQwenImage, one frame), normalised per channel as
the pipeline does ((z - latents_mean) / latents_std), [B, 16, H/8, W/8]; the DiT reads 2 x 2 patches packed into
64-dim tokens (as FLUX.1) with Qwen-Image's centred RoPE positions, and takes sigma. No guidance input: real CFG
against the empty prompt. Text: Qwen2.5-VL's last hidden state of the pipeline's prompt template without its
first 34 tokens, zero-padded to the run's length and masked. The pooled vector every batch carries is CLIP
ViT-L/14's text embedding, computed at encode time for the discriminator (the DiT reads none).
"""
from __future__ import annotations

import math

import torch

from .. import costs as F
from ..family import Family
from ..weight_groups import Group, attention_groups, condition_groups, linear, mlp_groups
from .arch import PRESETS, QwenImageArch


class QwenImageFamily(Family):
    name = "qwen_image"
    arch_cls = QwenImageArch
    label = QwenImageArch.label
    presets = PRESETS
    pipelines = ("QwenImagePipeline",)
    default_text_length = 512  # QwenImagePipeline's max_sequence_length
    clip_at_encode = True
    # AutoencoderKLQwenImage has no gradient checkpointing: its decoder keeps 1.30x what the FLUX.1 decoder keeps
    # without checkpointing (both measured with saved-tensor hooks at 256 px, CPU), i.e. 1.30 x 4.3e9 per 1024 px
    # image; 73.3 M decoder parameters
    vae_decoder = (5.6e9, 73.3e6)

    # ------------------------------------------------------------------ architecture
    def build(self, arch, config, backend, layout):
        from ..specs import mmdit_block_spec
        from .model import QwenImageModel

        return QwenImageModel(config, arch, mmdit_block_spec(backend, qk_norm=True), layout)

    def groups(self, arch):
        g = linear("img_in", "img_in") + [Group("txt_norm.weight", ("txt_norm.weight",))] + linear("txt_in", "txt_in")
        g += condition_groups(False, pooled=False)
        for i in range(arch.num_layers):
            o, t = f"joint_blocks.{i}", f"transformer_blocks.{i}"
            g += linear(f"{o}.adaln.linear", f"{t}.img_mod.1")
            g += linear(f"{o}.adaln_context.linear", f"{t}.txt_mod.1")
            g += attention_groups(f"{o}.attention", f"{t}.attn", joint=True, qk_norm=True, out=True, context_out=True)
            g += mlp_groups(f"{o}.mlp", f"{t}.img_mlp") + mlp_groups(f"{o}.mlp_context", f"{t}.txt_mlp")
        g += linear("norm_out.linear", "norm_out.linear") + linear("proj_out", "proj_out")
        return g

    # ------------------------------------------------------------------ interface
    def model_inputs(self, arch, x, sigma, text, pooled, guidance=None):
        from ..flux.model import pack_latents  # Qwen-Image packs latents exactly as FLUX.1 (its _pack_latents)
        from .model import text_mask

        h, w = x.shape[-2:]
        return dict(hidden_states=pack_latents(x), encoder_hidden_states=text, timestep=sigma,
                    img_shapes=[[(1, h // 2, w // 2)]], encoder_hidden_states_mask=text_mask(text))

    def velocity(self, arch, out, x):
        from ..flux.model import unpack_latents

        return unpack_latents(out, *x.shape[-2:])

    def image_tokens(self, arch, latent_h, latent_w):
        return (latent_h // 2) * (latent_w // 2)

    def reference_inputs(self, arch, batch, latent_hw, num_txt, g, guidance):
        h, w = latent_hw
        text = torch.randn(batch, num_txt, arch.joint_attention_dim, generator=g)
        mask = torch.ones(batch, num_txt, dtype=torch.long)
        if batch > 1 and num_txt > 3:  # prompts of different lengths: the last sample's final tokens are padding
            mask[-1, -3:] = 0
            text[-1, -3:] = 0
        return dict(hidden_states=torch.randn(batch, (h // 2) * (w // 2), arch.in_channels, generator=g),
                    encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                    timestep=torch.rand(batch, generator=g), img_shapes=[[(1, h // 2, w // 2)]] * batch)

    def our_inputs(self, arch, reference, num_txt):
        out = dict(reference)
        if out.get("encoder_hidden_states_mask") is not None and bool(out["encoder_hidden_states_mask"].all()):
            out["encoder_hidden_states_mask"] = None  # as the pipeline: nothing padded, no mask
        return out

    def per_sample_keys(self):
        return ("img_shapes",)

    # ------------------------------------------------------------------ schedule
    def default_shift(self, arch, num_image_tokens, num_steps):
        """QwenImagePipeline's dynamic shift: m = exp(mu), mu linear in the token count from 0.5 at 256 tokens to
        0.9 at 8192 (its scheduler config; 2.0 at 1024 px). The released scheduler also stretches a schedule to end
        at sigma 0.02 (shift_terminal): our anchors do not, and the exported student's scheduler drops it."""
        return math.exp(0.5 + (0.9 - 0.5) * (num_image_tokens - 256) / (8192 - 256))

    # ------------------------------------------------------------------ costs
    def block_costs(self, arch, batch, s_img, s_txt):
        return [F.mmdit_block(batch, s_img, s_txt, arch.hidden_size)] * arch.num_layers

    def embed_flops(self, arch, batch, s_img, s_txt):
        h = arch.hidden_size
        first = F.linear(batch * s_img, arch.in_channels, h) + F.linear(batch * s_txt, arch.joint_attention_dim, h)
        return first + F.condition_flops(batch, h), F.output_flops(batch, s_img, h, arch.out_dim)

    def block_params(self, arch):
        from ..flux import FAMILY as FLUX1

        # a Qwen-Image block is a FLUX.1 double block: the same linears, biases and QK norms
        return [FLUX1.block_params(_as_flux(arch))[0]] * arch.num_layers

    def embedder_params(self, arch):
        h, lin = arch.hidden_size, F.linear_params
        return (lin(arch.in_channels, h) + arch.joint_attention_dim + lin(arch.joint_attention_dim, h)
                + F.condition_params(h) + lin(h, 2 * h) + lin(h, arch.out_dim))

    def block_lora_linears(self, arch, index):
        h = arch.hidden_size
        qkv, proj = ("qkv", "column", h, 3 * h, 3), ("proj", "row", h, h, 1)
        fc1, fc2 = ("mlp", "column", h, 4 * h, 1), ("mlp", "row", 4 * h, h, 1)
        return [qkv, qkv, proj, proj, fc1, fc2, fc1, fc2]

    def block_kinds(self, arch, index):
        return ["joint"]  # measured for FLUX.1's double block, the same module

    def with_depth(self, arch, double, single=0, dual=0):
        import dataclasses

        return dataclasses.replace(arch, num_layers=double)

    def block_counts(self, arch):
        return arch.num_layers, 0, 0

    # ------------------------------------------------------------------ encoders
    def text_encoder(self, pipeline_dir, max_length=None, device="cpu", dtype=torch.float32, clip=None):
        from .text import QwenImageTextEncoder

        return QwenImageTextEncoder.from_pretrained(pipeline_dir, max_length or self.default_text_length, device,
                                                    dtype, clip)

    def vae(self, vae_dir, dtype=torch.float32, device="cpu"):
        from .vae import QwenImageVAE

        return QwenImageVAE.from_pretrained(vae_dir, dtype, device)

    def vae_factor(self, vae_dir=None):
        from ..vae import read_config

        cfg = read_config(vae_dir) if vae_dir else {}
        return 2 ** len(cfg.get("temperal_downsample", [False, True, True]))

    # ------------------------------------------------------------------ export
    def pipeline_overrides(self, arch, model_index):
        # the released scheduler stretches every schedule to end at sigma 0.02 (shift_terminal); the student was
        # trained at shift({1, (K-1)/K, ..., 1/K}) without it, which the stock call then gives exactly
        return {"scheduler/scheduler_config.json": {"shift_terminal": None}}


def _as_flux(arch):
    from ..flux.arch import FluxArch

    return FluxArch(num_layers=1, num_single_layers=0, attention_head_dim=arch.attention_head_dim,
                    num_attention_heads=arch.num_attention_heads, axes_dims_rope=arch.axes_dims_rope)


FAMILY = QwenImageFamily()
