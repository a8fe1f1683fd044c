"""Architecture configs: finding, building, reading and writing any family's dataclass.

Each family defines its dataclass in its own folder (`models/flux/arch.py`, ...) on models/arch_base.py, with
field names and meanings of the `config.json` diffusers writes for its transformer, so a config converts in both
directions without a rename table. The functions here find the family by preset name, diffusers class or the
`family` key of our checkpoints (models/registry.py).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .arch_base import Arch, ArchBase, ArchError  # noqa: F401  (ArchError is re-exported)
from .registry import FAMILIES


def presets() -> dict[str, ArchBase]:
    """Every family's presets by name (models/registry.py)."""
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
    for fam in FAMILIES.values():
        if fam.arch_cls.diffusers_class == cls_name:
            return fam
    return None


def supported_classes() -> str:
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
    d = dict(d)
    family = d.pop("family")
    if family not in FAMILIES:
        raise ArchError(f"a checkpoint of a {family!r} model: this build knows {', '.join(sorted(FAMILIES))}.")
    return arch_from_diffusers_config({"_class_name": FAMILIES[family].arch_cls.diffusers_class, **d})
