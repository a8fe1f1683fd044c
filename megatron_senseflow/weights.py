"""What an objective does to a role's weights without its process groups: freeze them for a while, list what it
trains, reach the optimizer's fp32 main copies, and IDA's blend of the fake score toward the generator.

Plain torch (no megatron-core import), so that methods.py can be read where no model is ever built (preflight.py
asks its objectives what a run trains).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .roles import Role


class frozen:
    """Weights that take no gradient for a while (the generator's terms differentiate through the fake
    score and the discriminator heads without writing their grads)."""

    def __init__(self, module: torch.nn.Module):
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)
        return False


def main_param_shards(optimizer) -> list[torch.Tensor]:
    """fp32 master copies an optimizer keeps apart from the model weights (empty for pure fp32 training).

    Megatron's distributed optimizer keeps this rank's shard of fp32 main weights
    for bf16 params (`shard_fp32_from_float16_groups`); the non-distributed mixed-
    precision optimizer keeps whole copies (`fp32_from_float16_groups`). fp32
    params are updated in place through views, so they have no separate copy.
    """
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    out: list[torch.Tensor] = []
    for opt in opts:
        for attr in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
            for group in getattr(opt, attr, []) or []:
                out.extend(group)
    return out


def trainable_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What a role trains: every weight, or its LoRA adapters (the base is the teacher's, frozen)."""
    return [p for p in module.parameters() if p.requires_grad]


@torch.no_grad()
def ida_blend(fake: Role, generator: Role, lam: float) -> dict[str, float]:
    """phi <- lam * phi + (1 - lam) * theta on this rank's shards, model weights and fp32 main copies.

    Blending only the (bf16) model weights would be undone by the fake score's
    next optimizer step, which writes its own fp32 main copy back. Returns this
    rank's shares (summed over TP and PP by the caller): `sq` = ||phi - theta||^2
    of the trained tensors after blending; with LoRA also `lora_err_sq` and
    `lora_move_sq`, the effective-weight error of blending factors and the exact
    rule's move (models/lora.py ida_factor_error), before blending.
    """
    out = {}
    if getattr(fake.module, "lora_spec", None) is not None:
        from megatron_senseflow.models.lora import ida_factor_error

        out["lora_err_sq"], out["lora_move_sq"] = ida_factor_error(fake.module, generator.module, lam)
    f_params = trainable_params(fake.module)
    g_params = trainable_params(generator.module)
    if [p.shape for p in f_params] != [p.shape for p in g_params]:
        raise RuntimeError("IDA needs generator and fake score with identical layouts.")
    sq = 0.0
    for pf, pg in zip(f_params, g_params):
        pf.mul_(lam).add_(pg, alpha=1 - lam)
        sq += float((pf.float() - pg.float()).square().sum())
    f_main, g_main = main_param_shards(fake.optimizer), main_param_shards(generator.optimizer)
    if len(f_main) != len(g_main) or any(a.shape != b.shape for a, b in zip(f_main, g_main)):
        raise RuntimeError("IDA needs generator and fake score optimizers with identical main-weight shards.")
    for mf, mg in zip(f_main, g_main):
        mf.mul_(lam).add_(mg, alpha=1 - lam)
    out["sq"] = sq
    return out
