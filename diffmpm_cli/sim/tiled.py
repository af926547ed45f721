"""The tiled P2G: a CUDA forward-only speed path, kept apart from the differentiable step.

One block of particles gathers its stencil contributions in shared memory before adding each touched node to the
global grid once (``kernels/tiled.py`` p2g_tiled). It is never taped; rollouts use it only for untaped forward steps
of a Simulator built with ``p2g=P2GMode.TILED``, which only ``diffmpm bench`` builds (on the H100 it pays only for
particles in no spatial order, together with a cell sort: BENCHMARKS.md). The sort buffers (2N ints) live here, so
a Simulator without it allocates none.
"""

from __future__ import annotations

import torch

from ..warp_runtime import warp
from .launch import Particles
from .model import MPMGrid, MPMModel, MPMState


class TiledP2G:
    """P2G by blocks of particles visited in cell order, re-sorted every ``sort_every`` steps (0: keep the given
    order; the state itself is never permuted, so results do not depend on the order beyond float rounding)."""

    def __init__(self, model: MPMModel, particles: Particles, *, sort_every: int = 0):
        wp = warp()
        from ..kernels import tiled

        self.model, self.particles, self.sort_every = model, particles, sort_every
        self.block = tiled.P2G_BLOCK if particles.device.startswith("cuda") else 1  # the CPU runs one lane per block
        self.kernel = tiled.p2g_tiled(model.bspline, model.models, self.block)
        n = particles.count
        # radix_sort_pairs needs room for 2 n keys and values
        self.order = wp.array(torch.arange(2 * n, dtype=torch.int32).numpy() % max(n, 1), dtype=int,
                              device=particles.device)
        self.keys = wp.zeros(2 * n, dtype=int, device=particles.device)
        self._steps_since_sort: int | None = None

    def sort_due(self) -> bool:
        """Advance the sort schedule by one step; True when this step sorts first."""
        if not self.sort_every:
            return False
        due = self._steps_since_sort is None or self._steps_since_sort >= self.sort_every
        self._steps_since_sort = 1 if due else self._steps_since_sort + 1
        return due

    def sort(self, state: MPMState) -> None:
        """Visiting order: particles by stencil cell (Warp's radix sort)."""
        wp = warp()
        from ..kernels import mpm, tiled

        g, n = self.model.grid, self.particles.count
        wp.launch(tiled.cell_keys, dim=n, device=self.particles.device, inputs=[
            self.model.kernel_constants.lower, g.inv_dx, mpm.BSPLINES[self.model.bspline][1], g.shape[1], g.shape[2],
            state.x,
        ], outputs=[self.keys, self.order])
        wp.utils.radix_sort_pairs(self.keys, self.order, n)

    def p2g(self, state_in: MPMState, grid: MPMGrid, *, mu, lam, kappa, Fc, control: int) -> None:
        """As ``launch.p2g`` (same arguments and result up to float rounding), through shared-memory blocks."""
        wp = warp()
        g, m, p = self.model.grid, self.model, self.particles
        wp.launch_tiled(self.kernel, dim=[(p.count + self.block - 1) // self.block], block_dim=self.block,
                        device=p.device, inputs=[
                            m.kernel_constants.lower, g.dx, m.dt, p.volume, p.mass, mu, lam, kappa, p.model_code,
                            m.bulk_viscosity,
                            Fc, control,
                            self.order,
                            state_in.x, state_in.v, state_in.F, state_in.C, state_in.Jp,
                        ], outputs=[grid.mass, grid.momentum])
