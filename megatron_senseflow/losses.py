"""Loss terms of SenseFlow, DMD2 and SiD as pure functions of tensors (no roles, no parallelism).

Shapes: latents [B, C, H, W]; per-sample weights [B]. Every function returns a
scalar mean over the batch so that data-parallel averaging of gradients gives
the full-batch gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .flow import bcast


def dmd_gradient(x0_hat: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD2's normalised score difference: (p_real - p_fake) / mean|p_real| per sample,
    with p_real = x0_hat - x0_teacher and p_fake = x0_hat - x0_fake."""
    p_real = x0_hat - x0_real
    p_fake = x0_hat - x0_fake
    norm = p_real.abs().mean(dim=tuple(range(1, p_real.ndim)), keepdim=True)
    return (p_real - p_fake) / norm.clamp_min(1e-12)


def dmd_loss(x0_hat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * mse(x0_hat, sg(x0_hat - grad)): its gradient w.r.t. x0_hat is grad / numel."""
    target = (x0_hat - grad).detach()
    return 0.5 * F.mse_loss(x0_hat.float(), target.float())


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """Elementwise sqrt((x - y)^2 + c^2) - c, averaged: ISG's loss (c = 1e-3)."""
    d = (x.float() - y.float()).square()
    return (torch.sqrt(d + c * c) - c).mean()


def isg_loss(x_g: torch.Tensor, x_tar: torch.Tensor, c: float) -> torch.Tensor:
    return pseudo_huber(x_g, x_tar.detach(), c)


def flow_matching_loss(v_pred: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Fake-score (and teacher) loss: mse(v, eps - x0) with x0 = sg(x0_hat)."""
    return F.mse_loss(v_pred.float(), (eps - x0).detach().float())


def gan_generator_loss(logits_B: torch.Tensor, weight_B: torch.Tensor) -> torch.Tensor:
    """-w(sigma_in) * D(fake), averaged over the batch."""
    return -(weight_B.float() * logits_B.float()).mean()


def gan_weight(sigma_in_B: torch.Tensor, power: float) -> torch.Tensor:
    """Zero at pure noise, growing toward clean inputs: (1 - sigma)^power (authors: power 2 for FLUX)."""
    return (1 - sigma_in_B).clamp_min(0) ** power


def hinge_d_loss(real_logits_B: torch.Tensor, fake_logits_B: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real_logits_B.float()).mean() + F.relu(1 + fake_logits_B.float()).mean()


def sid_weight(t_B: torch.Tensor, kind: str) -> torch.Tensor:
    t = t_B.float().clamp(1e-4, 1 - 1e-4)
    if kind == "one_minus_t":
        return 1 - t
    if kind == "one_minus_t_sq":
        return (1 - t) ** 2
    if kind == "inv_t":
        return 1 / t
    if kind == "snr":
        return ((1 - t) / t) ** 2
    raise ValueError(f"unknown SiD weighting {kind!r}")


def sid_loss(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, w_B: torch.Tensor, alpha: float) -> torch.Tensor:
    """SiD generator loss w(t) (y_real - y_fake) . ((y_real - x_g) - alpha (y_real - y_fake)).

    y_real / y_fake are the teacher's and fake score's x0 predictions at x_t and
    enter with stop-gradient (the gradient reaches the generator through x_g);
    the dot product is a per-element mean, weighted per sample.
    """
    yr, yf = y_real.detach().float(), y_fake.detach().float()
    diff = yr - yf
    per = (diff * ((yr - x_g.float()) - alpha * diff)).mean(dim=tuple(range(1, x_g.ndim)))
    return (w_B.float() * per).mean()


def weighted_mean(values_B: torch.Tensor, w_B: torch.Tensor) -> torch.Tensor:
    return (values_B * w_B).mean()


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).square().mean(dim=tuple(range(1, a.ndim)))


__all__ = [
    "bcast",
    "dmd_gradient",
    "dmd_loss",
    "pseudo_huber",
    "isg_loss",
    "flow_matching_loss",
    "gan_generator_loss",
    "gan_weight",
    "hinge_d_loss",
    "sid_weight",
    "sid_loss",
]
