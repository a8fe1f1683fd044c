"""FLUX.2's architecture config (diffusers `Flux2Transformer2DModel`) and its presets: dev (32B, guidance
embedding) and klein (4B / 9B, classifier-free guidance)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..arch_base import ArchBase, ArchError

CLIP_L_DIM = 768  # the pooled vector FLUX.2 batches carry: CLIP ViT-L/14's text embedding (the discriminator's)


@dataclass(kw_only=True)
class Flux2Arch(ArchBase):
    """FLUX.2 (`Flux2Transformer2DModel`): double-stream blocks, then single-stream blocks, with modulation shared
    by all blocks of a kind, SwiGLU MLPs, no biases, 4-axis RoPE, and a patchified 128-channel latent."""

    family: ClassVar[str] = "flux2"
    label: ClassVar[str] = "FLUX.2"
    diffusers_class: ClassVar[str] = "Flux2Transformer2DModel"

    patch_size: int = 1
    """Patch size inside the transformer; the latent arrives patchified (2 x 2 x 32 channels), so this stays 1."""
    in_channels: int = 128
    """Channels of one token: the VAE's 32 latent channels of a 2 x 2 patch."""
    out_channels: int | None = None
    """Output channels per token; None means equal to in_channels."""
    num_layers: int = 8
    """Number of double-stream blocks."""
    num_single_layers: int = 48
    """Number of single-stream blocks."""
    attention_head_dim: int = 128
    """Channels per attention head."""
    num_attention_heads: int = 48
    """Attention heads; hidden size is heads x head_dim."""
    joint_attention_dim: int = 15360
    """Width of the text embeddings: three hidden layers of the text model stacked (Mistral-Small 3 x 5120)."""
    timestep_guidance_channels: int = 256
    """Sinusoidal channels of the time (and guidance) embedding."""
    mlp_ratio: float = 3.0
    """SwiGLU hidden width over the model width."""
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    """RoPE channels for the (time, row, column, text position) id axes; they sum to head_dim."""
    rope_theta: int = 2000
    """RoPE base."""
    eps: float = 1e-6
    """Epsilon of the layer norms and QK RMS-norms."""
    guidance_embeds: bool = True
    """FLUX.2-dev embeds the guidance scale; klein does not (and a SenseFlow student drops it)."""

    @property
    def num_blocks(self) -> int:
        return self.num_layers + self.num_single_layers

    @property
    def latent_channels(self) -> int:
        return self.in_channels  # the model's latent space is the patchified one

    @property
    def out_dim(self) -> int:
        return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def pooled_dim(self) -> int:
        return CLIP_L_DIM

    def validate(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ArchError(f"axes_dims_rope {tuple(self.axes_dims_rope)} sums to {sum(self.axes_dims_rope)}, but "
                            f"FLUX.2 needs it to equal attention_head_dim={self.attention_head_dim}.")
        if len(self.axes_dims_rope) != 4:
            raise ArchError(f"FLUX.2's position ids have 4 axes, but axes_dims_rope has {len(self.axes_dims_rope)}.")
        if self.patch_size != 1 or self.timestep_guidance_channels != 256:
            raise ArchError("FLUX.2 with patch_size != 1 or timestep_guidance_channels != 256 is not a released "
                            "layout; this build supports the released ones.")
        if self.num_layers < 0 or self.num_single_layers < 0 or self.num_blocks == 0:
            raise ArchError("FLUX.2 needs at least one double or single block.")


PRESETS: dict[str, Flux2Arch] = {
    "flux2-dev": Flux2Arch(),
    "flux2-klein-4b": Flux2Arch(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                                guidance_embeds=False),
    "flux2-klein-9b": Flux2Arch(num_layers=8, num_single_layers=24, num_attention_heads=32,
                                joint_attention_dim=12288, guidance_embeds=False),
    # Small configs for CPU runs and tests; real layer types, narrow width.
    "tiny-flux2": Flux2Arch(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                            num_attention_heads=4, joint_attention_dim=48, axes_dims_rope=(4, 4, 4, 4)),
    "tiny-flux2-klein": Flux2Arch(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                  num_attention_heads=4, joint_attention_dim=48, axes_dims_rope=(4, 4, 4, 4),
                                  guidance_embeds=False),
}
