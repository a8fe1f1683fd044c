"""What every family's architecture dataclass shares, and the one layout rule (TP, PP and world size).

The ground floor of models/: it imports nothing of the families, so each family's `arch.py` builds on it and
configs.py (which finds a family's dataclass by preset, diffusers class or checkpoint) sits above the registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

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
    """The family's short name (models/registry.py; stored in checkpoints)."""
    label: ClassVar[str]
    """The family's name for people ('FLUX', 'SD3', 'Qwen-Image', 'FLUX.2')."""
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


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
