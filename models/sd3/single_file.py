"""SD3.x in Stability's single-file layout (sd3_medium / sd3.5_large / sd3.5_medium .safetensors: the MMDiT under
`model.diffusion_model.`, `joint_blocks.<i>.x_block` / `.context_block`), the inverse of diffusers'
`convert_sd3_transformer_checkpoint_to_diffusers`: q, k and v stack into `qkv` (and `attn2.qkv` in SD3.5 Medium's
dual-attention blocks); qk norms are `ln_q` / `ln_k`; the final adaLN's halves swap, and so do those of the last
block's context adaLN (a pre-only block: (shift, scale) only, no context output projection or MLP)."""
from __future__ import annotations

from ..single_file import Recipe, Step, blocks

PREFIX = "model.diffusion_model."
EMBEDDERS = (("pos_embed.proj", "x_embedder.proj"),
             ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
             ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
             ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
             ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
             ("context_embedder", "context_embedder"), ("proj_out", "final_layer.linear"))
NORMS = (("attn.norm_q", "x_block.attn.ln_q"), ("attn.norm_k", "x_block.attn.ln_k"),
         ("attn.norm_added_q", "context_block.attn.ln_q"), ("attn.norm_added_k", "context_block.attn.ln_k"),
         ("attn2.norm_q", "x_block.attn2.ln_q"), ("attn2.norm_k", "x_block.attn2.ln_k"))


def recipe(keys) -> list[Step]:
    r = Recipe(keys, prefix=PREFIX)
    r.rename("pos_embed", "pos_embed.pos_embed")
    for src, dst in EMBEDDERS:
        r.take(dst, src)
    r.take("final_layer.adaLN_modulation.1", "norm_out.linear", op="swap")
    n = blocks(keys, "transformer_blocks")
    for i in range(n):
        b, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        x, c = o + "x_block.", o + "context_block."
        r.take(x + "attn.qkv", *(b + f"attn.to_{q}" for q in "qkv"), op="cat")
        r.take(c + "attn.qkv", *(b + f"attn.add_{q}_proj" for q in "qkv"), op="cat")
        r.take(x + "attn.proj", b + "attn.to_out.0")
        r.take(x + "adaLN_modulation.1", b + "norm1.linear")
        r.take(x + "mlp.fc1", b + "ff.net.0.proj")
        r.take(x + "mlp.fc2", b + "ff.net.2")
        r.take(x + "attn2.qkv", *(b + f"attn2.to_{q}" for q in "qkv"), op="cat")
        r.take(x + "attn2.proj", b + "attn2.to_out.0")
        if i == n - 1:  # pre-only: its context adaLN is (shift, scale) in the original, (scale, shift) in diffusers
            r.take(c + "adaLN_modulation.1", b + "norm1_context.linear", op="swap")
        else:
            r.take(c + "adaLN_modulation.1", b + "norm1_context.linear")
            r.take(c + "attn.proj", b + "attn.to_add_out")
            r.take(c + "mlp.fc1", b + "ff_context.net.0.proj")
            r.take(c + "mlp.fc2", b + "ff_context.net.2")
        for src, dst in NORMS:
            r.rename(f"{o}{dst}.weight", f"{b}{src}.weight")
    return r.steps()
