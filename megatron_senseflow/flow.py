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


def default_shift(arch, num_image_tokens: int, num_steps: int) -> float:
    """The teacher's own shift at this many image tokens and sampling steps (its family says how: SD3.x 3.0,
    FLUX.1 and Qwen-Image resolution-dependent, FLUX.2 also step-dependent; models/<family>/__init__.py)."""
    from megatron_senseflow.models import family_of

    return family_of(arch).default_shift(arch, num_image_tokens, num_steps)


def anchors(num_steps: int, m: float) -> list[float]:
    """Student anchors tau_0 > tau_1 > ... > tau_{K-1}: shift({1, (K-1)/K, ..., 1/K}, m).

    With K=4 at FLUX 1024 px (4096 tokens) these are the paper's {1.0, 0.904, 0.759, 0.512}.
    The step after the last anchor goes to sigma = 0.
    """
    return [float(shift(1 - k / num_steps, m)) for k in range(num_steps)]


def student_anchors(num_steps: int, shift_m: float | None, arch, num_image_tokens: int,
                    rounding: str = "none") -> list[float]:
    """The run's anchors: `anchors` at the given shift (None = the family default at this resolution), then
    'floor_1000' truncates each to a multiple of 1/1000, as the FLUX trainer's hard-coded timesteps
    (1000, 904, 759, 512 at 1024 px, from 1.0, 0.9045, 0.7595, 0.5128)."""
    taus = anchors(num_steps, shift_m or default_shift(arch, num_image_tokens, num_steps))
    if rounding == "floor_1000":
        taus = [math.floor(t * 1000 + 1e-9) / 1000 for t in taus]
    return taus


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


# --------------------------------------------------------------------------- the authors' timestep laws
#
# The reference trainers draw noise levels through diffusers' FlowMatchEulerDiscreteScheduler
# with 1000 training steps, whose table (before set_timesteps) is
#   sigmas[i] = shift((1000 - i) / 1000, m),  i = 0..999     (FLUX.1-dev's config: dynamic shifting, so m = 1)
# and index it in two ways: `scheduler.sigmas[(u * 1000).long()]` for a logit-normal u, and a flipped
# copy `flip(sigmas)[t] = shift((t + 1) / 1000, m)` for an integer t. Both are reproduced here.

TABLE_STEPS = 1000


def table_sigma(t, m: float):
    """The flipped scheduler table at integer index t: shift((t + 1) / 1000, m) (SD3.5 trainer: self.sigmas[t])."""
    return shift((t + 1) / TABLE_STEPS, m)


def logit_normal_table(z_B: torch.Tensor, mean: float, std: float, m: float) -> torch.Tensor:
    """diffusers' `timesteps[(u * 1000).long()]` for u = sigmoid(mean + std z): sigma = shift(1 - floor(1000 u) / 1000, m)."""
    i = torch.floor(torch.sigmoid(z_B * std + mean) * TABLE_STEPS).clamp(0, TABLE_STEPS - 1)
    return shift((TABLE_STEPS - i) / TABLE_STEPS, m)


def uniform_index(u_B: torch.Tensor, lo: int, hi: int, m: float) -> torch.Tensor:
    """An integer t uniform in [lo, hi] (both ends included), then the flipped table: shift((t + 1) / 1000, m)."""
    t = lo + torch.floor(u_B * (hi - lo + 1)).clamp(max=hi - lo)
    return table_sigma(t, m)


def anchor_index(position: float) -> int:
    """The SD3.5 trainer's integer step of an unshifted anchor position s = 1 - k/K (999, 749, 499, 249 for K = 4)."""
    return round(TABLE_STEPS * position) - 1


def isg_sigma_grid_bounds(tau: float, tau_next: float, margin: int) -> tuple[int, int]:
    """FLUX ISG (trainer line F724): integer t_mid in [ceil(1000 tau_next + margin), floor(1000 tau - margin)]."""
    return math.ceil(TABLE_STEPS * tau_next + margin), math.floor(TABLE_STEPS * tau - margin)


def isg_index_grid_bounds(position: float, next_position: float | None, margin: int) -> tuple[int, int]:
    """SD3.5 ISG (S677-679): integer index t_mid in [t_next + margin, t - margin] on the flipped table, where the
    last segment ends at index 0 (sigma = shift(0.001), not 0: the authors' table has no zero)."""
    t = anchor_index(position)
    t_next = anchor_index(next_position) if next_position is not None else 0
    return t_next + margin, t - margin
