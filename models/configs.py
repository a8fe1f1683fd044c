"""Architecture configs: what every family's dataclass shares, and reading / writing them.

Each family defines its dataclass in its own folder (`models/flux/arch.py`, ...), with field names and
meanings of the `config.json` diffusers writes for its transformer, so a config converts in both directions
without a rename table. The functions here find the family by preset name, diffusers class or the `family`
key of our checkpoints (models/registry.py).
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

    guidance_embeds: ClassVar[bool] = False
    """The model embeds a guidance scale (FLUX.1-dev, FLUX.2-dev); a field in families that can."""

    @property
    def latent_channels(self) -> int:
        """Channels of the latent [B, C, H, W] the model denoises (the family's latent space, models/family.py)."""
        raise NotImplementedError

    @property
    def text_dim(self) -> int:
        """Width of the text embeddings the model reads."""
        return self.joint_attention_dim

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled vector every batch carries (the model's pooled text input, or the discriminator's
        CLIP ViT-L/14 condition for models that take none)."""
        return self.pooled_projection_dim

    @property
    def label(self) -> str:
        from .registry import FAMILIES

        return FAMILIES[self.family].label

    def validate(self) -> None:
        """Raise ArchError for a config that cannot be built."""

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


Arch = ArchBase  # any family's architecture (type hints)


def presets() -> dict[str, ArchBase]:
    """Every family's presets by name (models/registry.py)."""
    from .registry import FAMILIES

    return {name: arch for fam in FAMILIES.values() for name, arch in fam.presets.items()}


def arch_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _tuples(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Tuple-typed fields (RoPE axes, block index lists) from the lists JSON and YAML give."""
    for f in dataclasses.fields(cls):
        if f.name in kwargs and kwargs[f.name] is not None and "tuple" in str(f.type):
            kwargs[f.name] = tuple(kwargs[f.name])
    return kwargs


def make_arch(preset: str, overrides: dict[str, Any] | None = None) -> Arch:
    """Build a preset's architecture with some fields replaced; unknown names are an error."""
    known = presets()
    if preset not in known:
        raise ArchError(f"unknown model preset {preset!r}; choose one of {', '.join(sorted(known))}.")
    base = known[preset]
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - arch_fields(type(base)))
    if unknown:
        raise ArchError(
            f"unknown {base.family} architecture field(s) {unknown}; valid fields are "
            f"{', '.join(sorted(arch_fields(type(base))))}."
        )
    arch = dataclasses.replace(base, **_tuples(type(base), overrides))
    arch.validate()
    return arch


def _family_by_class(cls_name: str | None):
    from .registry import FAMILIES

    for fam in FAMILIES.values():
        if fam.arch_cls.diffusers_class == cls_name:
            return fam
    return None


def supported_classes() -> str:
    from .registry import FAMILIES

    return ", ".join(f"{f.arch_cls.diffusers_class} ({f.label})" for f in FAMILIES.values())


def arch_from_diffusers_config(cfg: dict[str, Any]) -> Arch:
    """Read a diffusers transformer config.json (as a dict) into its family's dataclass."""
    cls_name = cfg.get("_class_name")
    fam = _family_by_class(cls_name)
    if fam is None:
        raise ArchError(f"config.json describes a {cls_name!r}; supported are {supported_classes()}.")
    known = arch_fields(fam.arch_cls)
    arch = fam.arch_cls(**_tuples(fam.arch_cls, {k: v for k, v in cfg.items() if k in known}))
    arch.validate()
    return arch


def arch_of_diffusers_dir(directory: str | Path, family: str | None = None) -> Arch:
    """Our architecture for a diffusers transformer directory (its config.json), refusing a family other
    than `family` (a registry name) when one is given."""
    path = Path(directory) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArchError(f"{path} cannot be read as JSON ({e}); re-download the model or fix the file.") from None
    if not isinstance(cfg, dict) or "_class_name" not in cfg:
        raise ArchError(f"{path} has no _class_name, so it is not a diffusers model config.")
    cls = cfg["_class_name"]
    fam = _family_by_class(cls)
    if fam is None:
        raise ArchError(f"{path} describes a {cls}; supported are {supported_classes()}.")
    if family is not None and fam.name != family:
        raise ArchError(f"--model {family} was given, but {path} describes a {cls} ({fam.name}); "
                        f"pass --model {fam.name} or leave --model out.")
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
    from .registry import FAMILIES

    d = dict(d)
    family = d.pop("family")
    if family not in FAMILIES:
        raise ArchError(f"a checkpoint of a {family!r} model: this build knows {', '.join(sorted(FAMILIES))}.")
    return arch_from_diffusers_config({"_class_name": FAMILIES[family].arch_cls.diffusers_class, **d})


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
