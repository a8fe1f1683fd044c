"""The DiTs on megatron-core: FLUX.1, SD3 / SD3.5, Qwen-Image and FLUX.2, with local and TransformerEngine specs.

Each family lives in its own folder and is registered once (models/registry.py, models/family.py says what a
family answers). `build_model(arch, config, ...)` builds this pipeline stage's part of any family's model;
`transformer_config(arch, ...)` makes the megatron TransformerConfig that carries the parallel layout, dtype
and recompute settings (both in models/build.py).

Importing this package does not import megatron-core: reading a recipe, an architecture or a checkpoint's
description (the launcher, `--dry-run`, `memory-plan`, every refusal) takes a second instead of four. The names
of models/build.py and models/base.py are loaded when first used.
"""
from __future__ import annotations

import importlib

from .registry import FAMILIES, family_of

__all__ = ["build_model", "transformer_config", "stage_layout", "split_blocks", "DiTBase", "StageLayout", "FAMILIES",
           "family_of"]

_LAZY = {"build_model": "build", "transformer_config": "build", "stage_layout": "build", "split_blocks": "build",
         "fp8_init_context": "build", "DiTBase": "base", "StageLayout": "base"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
