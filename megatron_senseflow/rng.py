"""Per-sample random streams: every random draw of an iteration belongs to one global sample.

Sample `i` of iteration `step` draws from its own generator seeded by
(seed, stream, step, i). Consequences we rely on:
- the randomness does not depend on the parallel layout: a run at DP=2 draws,
  for the same global samples, exactly what a DP=1 run draws, so layouts can
  be compared loss for loss;
- all TP/PP ranks of one replica hold the same samples and draw the same noise;
- resuming needs no RNG state: (seed, step) says it all, on any layout;
- splitting a batch into pipeline microbatches does not change any draw.
This holds only if every sample makes the same draws whatever the rest of its
local batch does: draw unconditionally, then select.
Draws happen on the CPU and move to the device; a few per sample and step.
"""
from __future__ import annotations

import torch

_MASK = (1 << 63) - 1


def mix(*parts: int) -> int:
    """A 63-bit hash of integers: seeds of the noise streams here, the shuffle picks of the data loader."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        h ^= h >> 31
    return h


class BatchRandom:
    def __init__(self, seed: int, stream: int, step: int, sample_ids: list[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.gens = [torch.Generator().manual_seed(mix(seed, stream, step, s)) for s in sample_ids]

    @classmethod
    def _from(cls, gens, device) -> "BatchRandom":
        obj = cls.__new__(cls)
        obj.gens, obj.device = gens, device
        return obj

    def sub(self, sl: slice) -> "BatchRandom":
        """The streams of a slice of the batch (a pipeline microbatch); draws advance the same generators."""
        return BatchRandom._from(self.gens[sl], self.device)

    def __len__(self) -> int:
        return len(self.gens)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.gens]).to(self.device)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.stack([torch.rand(shape, generator=g) for g in self.gens]).to(self.device)

    def randint(self, high: int) -> torch.Tensor:
        return torch.stack([torch.randint(0, high, (), generator=g) for g in self.gens]).to(self.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(*x.shape[1:]).to(x.dtype)


def sample_ids(step: int, global_batch: int, dp_rank: int, local_batch: int) -> list[int]:
    """Global indices of this DP rank's samples in iteration `step`."""
    start = step * global_batch + dp_rank * local_batch
    return list(range(start, start + local_batch))
