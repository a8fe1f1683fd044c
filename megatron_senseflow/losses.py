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


def flow_matching_loss(v_pred: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Fake-score loss on target eps - sg(x0_hat): the mean over every element (SenseFlow: the authors'
    weighting is 1 for logit-normal sampling), or each sample's sum of squares averaged over samples (SiD-DiT)."""
    err = (v_pred.float() - (eps - x0).detach().float()).square()
    if reduction == "sum":
        return err.flatten(1).sum(1).mean()
    return err.mean()


def gan_generator_loss(logits_BN: torch.Tensor, weight_B: torch.Tensor) -> torch.Tensor:
    """-w(tau) * D(fake), D's logits averaged over every head's locations per sample (V124 keepdim), then
    over the batch."""
    return -(weight_B.float() * logits_BN.float().flatten(1).mean(1)).mean()


def hinge_d_terms(real_BN: torch.Tensor, fake_BN: torch.Tensor, weight_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The discriminator's hinge per location, each sample's mean times w(tau), averaged (F976-985):
    (mean_b w_b mean_n relu(1 - real_bn), mean_b w_b mean_n relu(1 + fake_bn))."""
    w = weight_B.float()
    real = (w * F.relu(1 - real_BN.float()).flatten(1).mean(1)).mean()
    fake = (w * F.relu(1 + fake_BN.float()).flatten(1).mean(1)).mean()
    return real, fake


def sid_weight(sigma_B: torch.Tensor, kind: str, x_g: torch.Tensor | None = None,
               y_real: torch.Tensor | None = None) -> torch.Tensor:
    """SiD-DiT's weighting schemes (no gradient), per sample; denominators clipped at 1e-5 as theirs."""
    s = sigma_B.detach().float()
    if kind == "one_minus_sigma":
        return 1 - s
    if kind == "one_minus_sigma_sq":
        return (1 - s) ** 2
    if kind == "inv_sigma":
        return 1 / s.clamp_min(1e-5)
    if kind == "inv_sigma_sq":
        return 1 / (s**2).clamp_min(1e-5)
    if kind == "snr":
        return 1 / ((s / (1 - s)) ** 2).clamp_min(1e-5)
    if kind == "snr_sqrt":
        return 1 / (s / (1 - s)).clamp_min(1e-5)
    if kind == "legacy":  # the original SiD: 1 / mean|x_g - y_real|
        return 1 / (x_g.detach().float() - y_real.detach().float()).abs().flatten(1).mean(1).clamp_min(1e-5)
    raise ValueError(f"unknown SiD weighting {kind!r}")


def sid_loss(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, w_B: torch.Tensor, alpha: float,
             scale: float = 1.0) -> torch.Tensor:
    """SiD generator loss, scale * mean_b w_b sum_chw (y_r - y_f) ((y_r - x_g) - alpha (y_r - y_f)).

    Differentiable in all three tensors: SiD's gradient flows through x_g directly and through the teacher
    and the fake score that produced y_real and y_fake from x_t (their input), not through stop-gradients.
    """
    yr, yf, xg = y_real.float(), y_fake.float(), x_g.float()
    diff = yr - yf
    per = (diff * ((yr - xg) - alpha * diff)).flatten(1).sum(1)
    return scale * (w_B.float() * per).mean()


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
    "hinge_d_terms",
    "sid_weight",
    "sid_loss",
]
