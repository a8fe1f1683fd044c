"""Few-step student sampling and many-step teacher sampling over a role (any TP/PP layout).

Student (anchors tau_0 > ... > tau_{K-1}, then 0):
- stochastic: x0_hat = x - tau_k v, then re-noise x0_hat to tau_{k+1} with fresh noise;
- euler: x <- x + (tau_{k+1} - tau_k) v.
Both return the last x0_hat (equal to the final Euler step, since tau_K = 0).
"""
from __future__ import annotations

from typing import Callable

import torch

from . import flow


def sample_student(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    taus: list[float],
    mode: str = "stochastic",
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """`velocity(x, sigma_B)` closes over the conditioning; `noise` is x at sigma = tau_0. `generator` draws the
    re-noising; a list holds one per sample (each sample's stream then does not depend on the batch it is in)."""
    if mode not in ("stochastic", "euler"):
        raise ValueError(f"sampler {mode!r} is unknown; use stochastic or euler.")
    b = noise.shape[0]
    x = noise
    x0 = noise
    for k, tau in enumerate(taus):
        sigma = torch.full((b,), tau, device=x.device)
        v = velocity(x, sigma)
        x0 = flow.x0_from_v(x, sigma, v)
        nxt = taus[k + 1] if k + 1 < len(taus) else 0.0
        if mode == "euler":
            x = flow.euler(x, sigma, torch.full_like(sigma, nxt), v)
        elif k + 1 < len(taus):
            if isinstance(generator, list):
                eps = torch.cat([torch.randn((1, *x.shape[1:]), generator=g, device=g.device) for g in generator]).to(x)
            else:
                eps = torch.randn(x.shape, generator=generator,
                                  device=generator.device if generator else x.device).to(x)
            x = flow.noise(x0, eps, torch.full_like(sigma, nxt))
    return x0


def sample_euler(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    sigmas: list[float],
) -> torch.Tensor:
    """Plain Euler over a decreasing sigma schedule ending at 0 (the teacher's sampler)."""
    x = noise
    b = noise.shape[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        sigma = torch.full((b,), s, device=x.device)
        x = flow.euler(x, sigma, torch.full_like(sigma, s_next), velocity(x, sigma))
    return x


def guided(velocity_cond, velocity_uncond, scale: float):
    """Classifier-free guidance: v_u + s (v_c - v_u)."""

    def v(x, sigma):
        vc = velocity_cond(x, sigma)
        if scale == 1.0:
            return vc
        vu = velocity_uncond(x, sigma)
        return vu + scale * (vc - vu)

    return v
