"""Single-file layouts: how a diffusers transformer's tensors become the one file of the model's original release
(FLUX.1: Black Forest Labs' flux1-dev.safetensors; SD3.x: Stability's sd3.5_large.safetensors), which ComfyUI and
Forge load and diffusers reads back with `from_single_file`.

A family describes its layout as a `Recipe`: one `Step` per original tensor, made from diffusers tensors by
renaming (`copy`), stacking along the output rows (`cat`: fused q/k/v and FLUX's single-block linear1) or swapping
the two halves of the rows (`swap`: the final adaLN, whose original order is (shift, scale) and diffusers'
(scale, shift)). The recipe is computed from the key names alone, so a writer can plan the file (shapes, dtypes)
before it reads a tensor and then read each source once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Step:
    key: str  # the tensor's name in the original layout
    op: str  # copy | cat | swap
    sources: tuple[str, ...]  # diffusers names, in order

    def shape(self, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        if self.op == "cat":
            return (sum(s[0] for s in shapes), *shapes[0][1:])
        return shapes[0]

    def make(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.op == "copy":
            return tensors[0]
        if self.op == "cat":
            return torch.cat(tensors, dim=0)
        shift_or_scale, other = tensors[0].chunk(2, dim=0)  # swap is its own inverse
        return torch.cat([other, shift_or_scale], dim=0)


class Recipe:
    """Built by a family's `single_file_recipe`: `take` consumes diffusers keys; `steps` refuses leftovers."""

    def __init__(self, keys, prefix: str = ""):
        self.left = set(keys)
        self.prefix = prefix
        self._steps: list[Step] = []

    def has(self, key: str) -> bool:
        return key in self.left

    def take(self, dst: str, *sources: str, op: str = "copy", params: tuple[str, ...] = ("weight", "bias")) -> None:
        """dst.<p> from <source>.<p> for each p of `params` the sources hold (a linear's weight and bias alike)."""
        for p in params:
            names = tuple(f"{s}.{p}" for s in sources)
            if not all(n in self.left for n in names):
                if any(n in self.left for n in names):
                    raise KeyError(f"{dst}.{p}: only some of {names} are present")
                continue
            self.left.difference_update(names)
            self._steps.append(Step(f"{self.prefix}{dst}.{p}", op, names))

    def rename(self, dst: str, src: str) -> None:
        """One tensor under a name that does not follow `.weight` (FLUX's norms are `.scale`, SD3's pos_embed)."""
        if src in self.left:
            self.left.discard(src)
            self._steps.append(Step(f"{self.prefix}{dst}", "copy", (src,)))

    def steps(self) -> list[Step]:
        if self.left:
            shown = ", ".join(sorted(self.left)[:5])
            raise KeyError(f"{len(self.left)} tensor(s) have no place in the original layout: {shown}")
        return list(self._steps)


def blocks(keys, prefix: str) -> int:
    """How many `prefix.<i>.` blocks the keys hold."""
    found = {int(k[len(prefix) + 1 :].split(".", 1)[0]) for k in keys if k.startswith(prefix + ".")}
    return max(found) + 1 if found else 0
