"""Architecture configs for the DiTs, one dataclass per family.

Field names and meanings mirror the `config.json` that diffusers writes for
`FluxTransformer2DModel` and `SD3Transformer2DModel`, so a config converts in
both directions without a rename table.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from megatron_senseflow.errors import UserError


class ArchError(UserError):
    """An architecture config that cannot be built (one sentence, names the value)."""


class LayoutError(ArchError):
    """A TP / PP / world-size layout this architecture cannot run. `kind` says which rule
    ('size', 'heads', 'blocks', 'world') and `allowed` the values that would work, so that each
    caller (config, launcher, verification) can say it in its own words."""

    def __init__(self, kind: str, message: str, allowed: list[int] | None = None):
        super().__init__(message)
        self.kind, self.allowed = kind, allowed or []


@dataclass(kw_only=True)
class ArchBase:
    """What every DiT family answers the same way; callers ask these instead of testing the family."""

    family: ClassVar[str]
    diffusers_class: ClassVar[str]
    num_layers: int
    """Transformer blocks (FLUX: the double-stream ones)."""
    num_attention_heads: int
    """Attention heads; TP must divide them."""
    attention_head_dim: int
    """Channels per attention head."""

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_blocks(self) -> int:
        """Transformer blocks in pipeline order (what PP splits)."""
        return self.num_layers

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latent the model denoises."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        return {"flux": "FLUX", "sd3": "SD3"}[self.family]

    def check_layout(self, tp: int, pp: int, cp: int = 1, world: int | None = None, exact_world: bool = False,
                     names: dict[str, str] | None = None) -> None:
        """The one layout rule: TP divides the heads, PP at most the blocks, the world a multiple of
        tp x pp x cp (`exact_world`: equal to it). `names` maps tp/pp/world to the caller's own
        words for them (flags, config keys); raises LayoutError."""
        n = {"tp": "tensor parallel size", "pp": "pipeline parallel size", "world": "world size", **(names or {})}
        for key, value in (("tp", tp), ("pp", pp), ("cp", cp)):
            if value < 1:
                raise LayoutError("size", f"{n.get(key, key)} {value} must be at least 1.")
        heads = self.num_attention_heads
        if heads % tp:
            ok = divisors(heads)
            raise LayoutError("heads", f"{n['tp']} {tp} does not divide {self.label}'s {heads} attention heads; "
                                       f"use one of {', '.join(map(str, ok))}.", ok)
        if pp > self.num_blocks:
            raise LayoutError("blocks", f"{n['pp']} {pp} exceeds the model's {self.num_blocks} blocks; "
                                        f"use at most {self.num_blocks} stages.")
        if world is not None:
            check_world(world, tp, pp, cp, exact_world, n["world"])


def check_world(world: int, tp: int, pp: int, cp: int = 1, exact: bool = False, name: str = "world size") -> None:
    """Processes for a layout: a multiple of tp x pp x cp (data parallel fills the rest), or `exact`ly it."""
    mp = tp * pp * cp
    if world != mp if exact else world % mp:
        rel = "equal to" if exact else "a multiple of"
        raise LayoutError("world", f"{name} {world} is not {rel} tp x pp x cp = {mp}.")


@dataclass(kw_only=True)
class FluxArch(ArchBase):
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


@dataclass(kw_only=True)
class SD3Arch(ArchBase):
    """SD3 / SD3.5 MMDiT (`SD3Transformer2DModel`)."""

    family: ClassVar[str] = "sd3"
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


def arch_of_diffusers_dir(directory: str | Path, family: str | None = None) -> Arch:
    """Our architecture for a diffusers transformer directory (its config.json), refusing a family other
    than `family` ('flux' / 'sd3') when one is given."""
    path = Path(directory) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArchError(f"{path} cannot be read as JSON ({e}); re-download the model or fix the file.") from None
    if not isinstance(cfg, dict) or "_class_name" not in cfg:
        raise ArchError(f"{path} has no _class_name, so it is not a diffusers model config.")
    cls = cfg["_class_name"]
    families = {FluxArch.diffusers_class: "flux", SD3Arch.diffusers_class: "sd3"}
    if cls not in families:
        raise ArchError(f"{path} describes a {cls}; only FluxTransformer2DModel (FLUX.1) and "
                        "SD3Transformer2DModel (SD3 / SD3.5) are supported.")
    if family is not None and families[cls] != family:
        raise ArchError(f"--model {family} was given, but {path} describes a {cls} ({families[cls]}); "
                        f"pass --model {families[cls]} or leave --model out.")
    try:
        return arch_from_diffusers_config(cfg)
    except TypeError as e:
        raise ArchError(f"{path}: {e}") from None


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
