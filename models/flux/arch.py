"""FLUX.1's architecture config (diffusers `FluxTransformer2DModel`) and its presets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..arch_base import ArchBase, ArchError


@dataclass(kw_only=True)
class FluxArch(ArchBase):
    """FLUX.1 (`FluxTransformer2DModel`): double-stream MMDiT blocks, then single-stream blocks."""

    family: ClassVar[str] = "flux"
    label: ClassVar[str] = "FLUX"
    diffusers_class: ClassVar[str] = "FluxTransformer2DModel"

    patch_size: int = 1
    """Patch size inside the transformer; FLUX packs 2x2 latent patches outside, so this stays 1."""
    in_channels: int = 64
    """Channels of one packed token (16 latent channels x 2 x 2)."""
    out_channels: int | None = None
    """Output channels per token; None means equal to in_channels."""
    num_layers: int = 19
    """Number of double-stream (MMDiT) blocks."""
    num_single_layers: int = 38
    """Number of single-stream blocks."""
    attention_head_dim: int = 128
    """Channels per attention head."""
    num_attention_heads: int = 24
    """Attention heads; hidden size is heads x head_dim."""
    joint_attention_dim: int = 4096
    """Width of the T5 text embeddings fed to the context embedder."""
    pooled_projection_dim: int = 768
    """Width of the pooled CLIP text embedding."""
    guidance_embeds: bool = False
    """FLUX.1-dev embeds the guidance scale; schnell and the SenseFlow student do not."""
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    """RoPE channels for the (text, row, column) id axes; they sum to head_dim."""

    @property
    def num_blocks(self) -> int:
        return self.num_layers + self.num_single_layers

    @property
    def latent_channels(self) -> int:
        return self.in_channels // 4  # a token packs a 2 x 2 patch of latent channels

    @property
    def out_dim(self) -> int:
        return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

    def validate(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ArchError(
                f"axes_dims_rope {tuple(self.axes_dims_rope)} sums to {sum(self.axes_dims_rope)}, "
                f"but FLUX needs it to equal attention_head_dim={self.attention_head_dim}."
            )
        if self.num_layers < 0 or self.num_single_layers < 0 or self.num_layers + self.num_single_layers == 0:
            raise ArchError("FLUX needs at least one double or single block.")




# Released architectures. The FLUX student is FLUX.1-dev without the guidance
# embedding: SenseFlow's generator and fake score do not take a guidance scale.
PRESETS: dict[str, FluxArch] = {
    "flux-dev": FluxArch(guidance_embeds=True),
    "flux-schnell": FluxArch(guidance_embeds=False),
    "flux-student": FluxArch(guidance_embeds=False),
    # Small config for CPU runs and tests; real layer types, narrow width.
    "tiny-flux": FluxArch(
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
}
