"""Architecture configs for the DiTs, one dataclass per family.

Field names and meanings mirror the `config.json` that diffusers writes for
`FluxTransformer2DModel` and `SD3Transformer2DModel`, so a config converts in
both directions without a rename table.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


class ArchError(ValueError):
    """An architecture config that cannot be built (one sentence, names the value)."""


@dataclass(kw_only=True)
class FluxArch:
    """FLUX.1 (`FluxTransformer2DModel`): double-stream MMDiT blocks, then single-stream blocks."""

    family: ClassVar[str] = "flux"
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
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

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


@dataclass(kw_only=True)
class SD3Arch:
    """SD3 / SD3.5 MMDiT (`SD3Transformer2DModel`)."""

    family: ClassVar[str] = "sd3"
    diffusers_class: ClassVar[str] = "SD3Transformer2DModel"

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
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

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


Arch = FluxArch | SD3Arch

# Released architectures. The FLUX student is FLUX.1-dev without the guidance
# embedding: SenseFlow's generator and fake score do not take a guidance scale.
PRESETS: dict[str, Arch] = {
    "flux-dev": FluxArch(guidance_embeds=True),
    "flux-schnell": FluxArch(guidance_embeds=False),
    "flux-student": FluxArch(guidance_embeds=False),
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
    # Small configs for CPU runs and tests; real layer types, narrow width.
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


def arch_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def make_arch(preset: str, overrides: dict[str, Any] | None = None) -> Arch:
    """Build a preset's architecture with some fields replaced; unknown names are an error."""
    if preset not in PRESETS:
        raise ArchError(f"unknown model preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}.")
    base = PRESETS[preset]
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - arch_fields(type(base)))
    if unknown:
        raise ArchError(
            f"unknown {base.family} architecture field(s) {unknown}; valid fields are "
            f"{', '.join(sorted(arch_fields(type(base))))}."
        )
    for k in ("axes_dims_rope", "dual_attention_layers"):
        if k in overrides and overrides[k] is not None:
            overrides[k] = tuple(overrides[k])
    arch = dataclasses.replace(base, **overrides)
    arch.validate()
    return arch


def arch_from_diffusers_config(cfg: dict[str, Any]) -> Arch:
    """Read a diffusers transformer config.json (as a dict) into our dataclass."""
    cls_name = cfg.get("_class_name")
    for cls in (FluxArch, SD3Arch):
        if cls_name == cls.diffusers_class:
            known = arch_fields(cls)
            kwargs = {k: v for k, v in cfg.items() if k in known}
            for k in ("axes_dims_rope", "dual_attention_layers"):
                if kwargs.get(k) is not None:
                    kwargs[k] = tuple(kwargs[k])
            arch = cls(**kwargs)
            arch.validate()
            return arch
    raise ArchError(
        f"config.json describes a {cls_name!r}; only FluxTransformer2DModel and SD3Transformer2DModel are supported."
    )


def arch_to_diffusers_config(arch: Arch) -> dict[str, Any]:
    out: dict[str, Any] = {"_class_name": arch.diffusers_class}
    for f in dataclasses.fields(arch):
        v = getattr(arch, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def arch_to_dict(arch: Arch) -> dict[str, Any]:
    return {"family": arch.family, **{k: v for k, v in arch_to_diffusers_config(arch).items() if k != "_class_name"}}


def arch_from_dict(d: dict[str, Any]) -> Arch:
    d = dict(d)
    family = d.pop("family")
    cls = {"flux": FluxArch, "sd3": SD3Arch}[family]
    return arch_from_diffusers_config({"_class_name": cls.diffusers_class, **d})


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
