"""Flow-matching maths shared by training and sampling (docs/design.md, "Conventions").

sigma in [0, 1], sigma = 1 is pure noise: x_sigma = (1 - sigma) x0 + sigma eps.
Networks predict velocity v = eps - x0, so x0_hat = x_sigma - sigma v and an
Euler step is x_next = x_sigma + (sigma_next - sigma) v. Per-sample sigmas are
[B] tensors and broadcast over [B, C, H, W].
"""
from __future__ import annotations

import math

import torch


def bcast(s_B: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s_B.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def noise(x0: torch.Tensor, eps: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
    s = bcast(sigma_B, x0)
    return (1 - s) * x0 + s * eps


def x0_from_v(x: torch.Tensor, sigma_B: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return x - bcast(sigma_B, x) * v


def euler(x: torch.Tensor, sigma_B: torch.Tensor, sigma_next_B: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return x + bcast(sigma_next_B - sigma_B, x) * v


def shift(s, m: float):
    """Timestep shift m*s / (1 + (m-1)*s); works on floats and tensors."""
    return m * s / (1 + (m - 1) * s)


def flux_mu(num_image_tokens: int) -> float:
    """FLUX's resolution-dependent log-shift: 0.5 at 256 tokens to 1.15 at 4096, linear in between (and beyond)."""
    return 0.5 + (1.15 - 0.5) * (num_image_tokens - 256) / (4096 - 256)


def default_shift(family: str, num_image_tokens: int) -> float:
    return math.exp(flux_mu(num_image_tokens)) if family == "flux" else 3.0


def anchors(num_steps: int, m: float) -> list[float]:
    """Student anchors tau_0 > tau_1 > ... > tau_{K-1}: shift({1, (K-1)/K, ..., 1/K}, m).

    With K=4 at FLUX 1024 px (4096 tokens) these are the paper's {1.0, 0.904, 0.759, 0.512}.
    The step after the last anchor goes to sigma = 0.
    """
    return [float(shift(1 - k / num_steps, m)) for k in range(num_steps)]


def next_anchor(taus: list[float], idx_B: torch.Tensor) -> torch.Tensor:
    """tau_{i+1} for each sample's anchor index i (0 after the last anchor)."""
    table = torch.tensor(list(taus) + [0.0], device=idx_B.device)
    return table[idx_B + 1]


def anchor_values(taus: list[float], idx_B: torch.Tensor) -> torch.Tensor:
    return torch.tensor(taus, device=idx_B.device)[idx_B]


def logit_normal(z_B: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """sigmoid(mean + std * z) for standard-normal draws z."""
    return torch.sigmoid(z_B * std + mean)


def uniform(u_B: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """lo + (hi - lo) * u for uniform draws u in [0, 1)."""
    return lo + (hi - lo) * u_B


def teacher_sigmas(num_steps: int, m: float) -> list[float]:
    """Many-step Euler schedule of the teacher: shift(linspace(1, 0, N + 1))."""
    return [float(shift(1 - k / num_steps, m)) for k in range(num_steps + 1)]
