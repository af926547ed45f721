"""Slow, obvious float64 twins of the MPM transfers: every particle against every grid node."""

from __future__ import annotations

import torch


def bspline_ref(d: torch.Tensor, order: str) -> torch.Tensor:
    """The 1-D B-spline N(d) at signed distances d (in cells): quadratic support |d| < 1.5, cubic |d| < 2."""
    a = d.abs()
    if order == "quadratic":
        return torch.where(a < 0.5, 0.75 - a**2, torch.where(a < 1.5, 0.5 * (1.5 - a) ** 2, torch.zeros_like(a)))
    if order == "cubic":
        return torch.where(a < 1.0, 0.5 * a**3 - a**2 + 2.0 / 3.0,
                           torch.where(a < 2.0, (2.0 - a) ** 3 / 6.0, torch.zeros_like(a)))
    raise ValueError(order)


def grid_mass_ref(positions: torch.Tensor, masses: torch.Tensor, *, lower, dx: float, shape, order: str) -> torch.Tensor:
    """Dense grid mass: m_i = sum_p m_p prod_axes N((x_p - x_i) / dx), float64, shape ``shape``."""
    x = (positions.to(torch.float64) - torch.as_tensor(lower, dtype=torch.float64)) / dx
    weights = [bspline_ref(x[:, a, None] - torch.arange(shape[a], dtype=torch.float64)[None, :], order)
               for a in range(3)]
    return torch.einsum("p,pi,pj,pk->ijk", masses.to(torch.float64), *weights)
