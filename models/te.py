"""TransformerEngine pieces of the `te` layer spec (GPU only; imported by models/specs.py on demand).

The joint attention of MMDiT needs no mask: TE's fused attention runs it as
plain self-attention over the [text; image] sequence in sbhd layout, which is
exactly the q/k/v_SBND our attention module produces after RoPE.
"""
from __future__ import annotations

from megatron.core.extensions.transformer_engine import TEDotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class TECoreAttention(TEDotProductAttention):
    """Our core-attention interface (q, k, v) -> o_SB(ND) on top of megatron's TE attention."""

    def __init__(self, config, **kwargs):
        super().__init__(config=config, layer_number=1, attn_mask_type=AttnMaskType.no_mask, attention_type="self")

    def forward(self, q_SBND, k_SBND, v_SBND, mask_BS=None):
        if mask_BS is not None:
            # a key mask in the middle of the joint sequence (Qwen-Image's padded text before the image tokens):
            # TE's padding masks take trailing padding only, so this call runs torch SDPA (its memory-efficient
            # kernel on GPU); the TE linears around it keep their FP8 GEMMs
            from .layers import sdpa

            return sdpa(q_SBND, k_SBND, v_SBND, mask_BS)
        # q/k/v arrive as strided views of the fused QKV output; TE's fused kernels want dense sbhd
        q_SBND, k_SBND, v_SBND = q_SBND.contiguous(), k_SBND.contiguous(), v_SBND.contiguous()
        out = super().forward(q_SBND, k_SBND, v_SBND, attention_mask=None, attn_mask_type=AttnMaskType.no_mask)
        return out.reshape(out.shape[0], out.shape[1], -1)
