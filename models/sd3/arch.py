"""SD3 / SD3.5's architecture config (diffusers `SD3Transformer2DModel`) and its presets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..arch_base import ArchBase, ArchError


@dataclass(kw_only=True)
class SD3Arch(ArchBase):
    """SD3 / SD3.5 MMDiT (`SD3Transformer2DModel`)."""

    family: ClassVar[str] = "sd3"
    label: ClassVar[str] = "SD3"
    diffusers_class: ClassVar[str] = "SD3Transformer2DModel"
    guidance_embeds: ClassVar[bool] = False  # no guidance input: SD3.x takes real CFG

    sample_size: int = 128
    """Latent size the model was trained at (diffusers keeps it; the forward accepts other sizes)."""
    patch_size: int = 2
    """Side of the square latent patch that becomes one token."""
    in_channels: int = 16
    """Latent channels."""
    num_layers: int = 24
    """Number of joint (MMDiT) blocks; the last one's context branch is pre-only."""
    attention_head_dim: int = 64
    """Channels per attention head."""
    num_attention_heads: int = 24
    """Attention heads; hidden size is heads x head_dim."""
    joint_attention_dim: int = 4096
    """Width of the text-encoder sequence embeddings (CLIP-L + CLIP-G padded, concatenated with T5)."""
    caption_projection_dim: int = 1536
    """Output width of the context embedder; equals the hidden size in every released model."""
    pooled_projection_dim: int = 2048
    """Width of the pooled text embedding (CLIP-L + CLIP-G)."""
    out_channels: int = 16
    """Output latent channels."""
    pos_embed_max_size: int = 192
    """Side of the learned positional-embedding grid; inputs use a centred crop of it."""
    dual_attention_layers: tuple[int, ...] = ()
    """Blocks with the second, image-only attention of SD3.5 Medium (MMDiT-X)."""
    qk_norm: str | None = None
    """'rms_norm' for SD3.5 (QK RMS-norm); None for SD3."""

    @property
    def latent_channels(self) -> int:
        return self.in_channels

    @property
    def out_dim(self) -> int:
        return self.patch_size * self.patch_size * self.out_channels

    def validate(self) -> None:
        if self.caption_projection_dim != self.hidden_size:
            raise ArchError(
                f"caption_projection_dim={self.caption_projection_dim} must equal the hidden size "
                f"{self.hidden_size} (heads x head_dim), as in every released SD3.x model."
            )
        if self.qk_norm not in (None, "rms_norm"):
            raise ArchError(f"qk_norm={self.qk_norm!r} is not supported; use 'rms_norm' or null.")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ArchError(f"dual_attention_layers {bad} are outside 0..{self.num_layers - 1}.")
        if self.num_layers < 1:
            raise ArchError("SD3 needs at least one block.")



PRESETS: dict[str, SD3Arch] = {
    "sd3-medium": SD3Arch(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    "sd35-medium": SD3Arch(
        num_layers=24,
        num_attention_heads=24,
        caption_projection_dim=1536,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    ),
    "sd35-large": SD3Arch(
        num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192, qk_norm="rms_norm"
    ),
    # Small config for CPU runs and tests; real layer types, narrow width.
    "tiny-sd3": SD3Arch(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=64,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ),
}
