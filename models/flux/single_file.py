"""FLUX.1 in Black Forest Labs' single-file layout (flux1-dev.safetensors: `double_blocks.*`, `single_blocks.*`, no
prefix), the inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`: q, k and v stack into one
qkv per stream; a single block's q, k, v and MLP-in stack into `linear1`; norms are `.scale`; the final adaLN's
halves swap. A student without the guidance embedder has no `guidance_in` (as FLUX.1-schnell's file)."""
from __future__ import annotations

from ..single_file import Recipe, Step, blocks

EMBEDDERS = (("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
             ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
             ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
             ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
             ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
             ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
             ("context_embedder", "txt_in"), ("x_embedder", "img_in"), ("proj_out", "final_layer.linear"))
DOUBLE = (("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
          ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
          ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
          ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"))
DOUBLE_NORMS = (("attn.norm_q", "img_attn.norm.query_norm"), ("attn.norm_k", "img_attn.norm.key_norm"),
                ("attn.norm_added_q", "txt_attn.norm.query_norm"), ("attn.norm_added_k", "txt_attn.norm.key_norm"))


def recipe(keys) -> list[Step]:
    r = Recipe(keys)
    for src, dst in EMBEDDERS:
        r.take(dst, src)
    r.take("final_layer.adaLN_modulation.1", "norm_out.linear", op="swap")
    for i in range(blocks(keys, "transformer_blocks")):
        b, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        r.take(o + "img_attn.qkv", *(b + f"attn.to_{x}" for x in "qkv"), op="cat")
        r.take(o + "txt_attn.qkv", *(b + f"attn.add_{x}_proj" for x in "qkv"), op="cat")
        for src, dst in DOUBLE:
            r.take(o + dst, b + src)
        for src, dst in DOUBLE_NORMS:
            r.rename(f"{o}{dst}.scale", f"{b}{src}.weight")
    for i in range(blocks(keys, "single_transformer_blocks")):
        b, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        r.take(o + "linear1", *(b + f"attn.to_{x}" for x in "qkv"), b + "proj_mlp", op="cat")
        r.take(o + "linear2", b + "proj_out")
        r.take(o + "modulation.lin", b + "norm.linear")
        r.rename(o + "norm.query_norm.scale", b + "attn.norm_q.weight")
        r.rename(o + "norm.key_norm.scale", b + "attn.norm_k.weight")
    return r.steps()
