"""Qwen-Image's architecture config (diffusers `QwenImageTransformer2DModel`) and its presets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..arch_base import ArchBase, ArchError

CLIP_L_DIM = 768  # the pooled vector Qwen-Image batches carry: CLIP ViT-L/14's text embedding (the discriminator's)


@dataclass(kw_only=True)
class QwenImageArch(ArchBase):
    """Qwen-Image (`QwenImageTransformer2DModel`): dual-stream MMDiT blocks over [text; image], text embeddings of
    Qwen2.5-VL (RMS-normed, then projected), a time embedding only (no pooled text, no guidance input)."""

    family: ClassVar[str] = "qwen_image"
    label: ClassVar[str] = "Qwen-Image"
    diffusers_class: ClassVar[str] = "QwenImageTransformer2DModel"

    patch_size: int = 2
    """Side of the latent patch one token packs (done outside the transformer, as FLUX.1: 2 x 2 x C channels)."""
    in_channels: int = 64
    """Channels of one packed token (16 latent channels x 2 x 2)."""
    out_channels: int | None = 16
    """Latent channels of the output; a token's output is patch x patch x out_channels."""
    num_layers: int = 60
    """Number of dual-stream (MMDiT) blocks."""
    attention_head_dim: int = 128
    """Channels per attention head."""
    num_attention_heads: int = 24
    """Attention heads; hidden size is heads x head_dim."""
    joint_attention_dim: int = 3584
    """Width of the Qwen2.5-VL text embeddings (its hidden size)."""
    guidance_embeds: bool = False
    """A guidance-distilled variant would embed a scale; diffusers' forward does not support it (no release has one)."""
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    """RoPE channels for the (frame, row, column) axes; they sum to head_dim."""
    zero_cond_t: bool = False
    """Qwen-Image-Edit-2511's per-token time conditioning; not supported here."""
    use_additional_t_cond: bool = False
    """Qwen-Image-Layered's extra time condition; not supported here."""
    use_layer3d_rope: bool = False
    """Qwen-Image-Layered's layer RoPE; not supported here."""

    @property
    def latent_channels(self) -> int:
        return self.in_channels // (self.patch_size * self.patch_size)

    @property
    def out_dim(self) -> int:
        return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

    @property
    def pooled_dim(self) -> int:
        return CLIP_L_DIM

    def validate(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ArchError(f"axes_dims_rope {tuple(self.axes_dims_rope)} sums to {sum(self.axes_dims_rope)}, but "
                            f"Qwen-Image needs it to equal attention_head_dim={self.attention_head_dim}.")
        for name in ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope", "guidance_embeds"):
            if getattr(self, name):
                raise ArchError(f"{name}=true belongs to a Qwen-Image variant (edit, layered or guidance-distilled) "
                                "this build does not support; distil the text-to-image Qwen-Image.")
        if self.patch_size != 2 or self.in_channels % 4:
            raise ArchError(f"Qwen-Image packs 2 x 2 latent patches: patch_size must be 2 and in_channels a multiple "
                            f"of 4 (got {self.patch_size}, {self.in_channels}).")
        if self.num_layers < 1:
            raise ArchError("Qwen-Image needs at least one block.")


PRESETS: dict[str, QwenImageArch] = {
    "qwen-image": QwenImageArch(),
    # Small config for CPU runs and tests; real layer types, narrow width.
    "tiny-qwen-image": QwenImageArch(
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    ),
}
