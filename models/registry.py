"""The model families, registered once (one line each); everything outside models/ asks `family_of(arch)`."""
from __future__ import annotations

from .family import Family
from .flux import FAMILY as FLUX1
from .flux2 import FAMILY as FLUX2
from .qwen_image import FAMILY as QWEN_IMAGE
from .sd3 import FAMILY as SD3

FAMILIES: dict[str, Family] = {f.name: f for f in (FLUX1, SD3, QWEN_IMAGE, FLUX2)}


def family_of(arch_or_name) -> Family:
    """The family of an architecture (or of a family name)."""
    name = arch_or_name if isinstance(arch_or_name, str) else arch_or_name.family
    return FAMILIES[name]


def family_of_pipeline(class_name: str) -> Family | None:
    """The family whose diffusers pipeline class `class_name` is (model_index.json's _class_name)."""
    for fam in FAMILIES.values():
        if any(class_name.startswith(p) for p in fam.pipelines):
            return fam
    return None
