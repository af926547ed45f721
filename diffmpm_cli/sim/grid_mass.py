"""Particle mass -> grid mass with the simulation's B-spline (the target's geometry on the grid)."""

from __future__ import annotations

import torch

from ..warp_runtime import warp, warp_device
from .grid import GridSpec


def grid_mass(positions: torch.Tensor, masses: torch.Tensor, *, grid: GridSpec, bspline: str) -> torch.Tensor:
    """Grid mass [nx, ny, nz] (kg) of particles at ``positions`` [N, 3] (m) with ``masses`` [N] (kg).

    Transfers with the quadratic (27-node) or cubic (64-node) B-spline. Particles must lie in the grid interior
    (``GridSpec.interior_*``); a stencil that would leave the grid is clamped to its edge.
    """
    wp = warp()
    from ..kernels import mpm

    kernel = mpm.p2g_mass[bspline]
    device = positions.device
    x = positions.detach().to(torch.float32).contiguous()
    m = masses.detach().to(device=device, dtype=torch.float32).contiguous()
    out = torch.zeros(grid.shape, dtype=torch.float32, device=device)
    if len(x):
        wp.launch(
            kernel,
            dim=len(x),
            inputs=[wp.vec3(*grid.lower), grid.inv_dx, wp.from_torch(x, dtype=wp.vec3), wp.from_torch(m)],
            outputs=[wp.from_torch(out)],
            device=warp_device(device),
        )
    return out
