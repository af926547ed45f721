"""MPM step launches and the checkpointed rollout (forward without a tape, backward segment by segment).

The forward keeps only the states at segment starts. The backward replays each segment, last first, under a
fresh ``wp.Tape`` with one state and one grid per step (nothing a taped launch read is ever overwritten), seeds
the segment end with the gradient arriving from later segments plus that of any output frame there, and passes
the gradient of the segment's start state on. All control layers, E/nu and the initial state get their
gradients from this single backward sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import SimulationError
from ..warp_runtime import warp, warp_device
from .grid import default_segment_length
from .model import MPMGrid, MPMModel, MPMState

STATE_DTYPES = ("vec3", "vec3", "mat33", "mat33")
NODE_MASS_EPS = 1.0e-8  # relative to the mean particle mass


def segment_bounds(steps: int, frames, segment_length: int | None) -> list[tuple[int, int]]:
    """[(start, end)] covering 0..steps, cut every ``segment_length`` steps and at every frame step."""
    length = segment_length or default_segment_length(steps)
    cuts = {steps, *range(length, steps, length), *(f for f in frames if 0 < f < steps)}
    bounds, start = [], 0
    for end in sorted(cuts):
        bounds.append((start, end))
        start = end
    return bounds


class Simulator:
    """Launches MPM steps for one model and one set of particles (mass [N] kg, rest volume [N] m^3).

    ``p2g``: "plain" (one thread per particle, global atomics; the default) or "tiled" (a shared-memory reduction
    per block of particles, used by untaped forward steps; taped replays always use "plain"). On the H100 the tiled
    P2G only pays for particles in no spatial order, together with ``sort_every`` (BENCHMARKS.md).
    ``sort_every``: with "tiled", visit particles in cell order, re-sorted every this many steps (0 = keep the
    given order); the state itself is never permuted, so results do not depend on it beyond float rounding.
    """

    def __init__(self, model: MPMModel, *, mass: torch.Tensor, volume: torch.Tensor, p2g: str | None = None,
                 sort_every: int = 0):
        wp = warp()
        from ..kernels import mpm

        self.model = model
        self.device = warp_device(mass.device)
        self.torch_device = mass.device
        self.particle_count = int(mass.shape[0])
        self.mass = wp.from_torch(mass.detach().float().contiguous().clone())
        self.volume = wp.from_torch(volume.detach().to(mass.device).float().contiguous().clone())
        self._p2g = mpm.p2g[(model.bspline, model.material)]
        self._grid_update = mpm.grid_update
        self._g2p = mpm.g2p[model.bspline]
        g = model.grid
        self._lower = wp.vec3(*g.lower)
        self._interior = (wp.vec3(*g.interior_lower), wp.vec3(*g.interior_upper))
        self.clamped = wp.zeros(1, dtype=int, device=self.device)
        self.J_min = wp.zeros(max(self.particle_count, 1), dtype=float, device=self.device)  # lowest det F per particle
        self.p2g_mode = p2g or "plain"
        if self.p2g_mode not in ("plain", "tiled"):
            raise ValueError(f"p2g must be 'plain' or 'tiled', got {p2g!r}")
        self.sort_every = sort_every
        self._block = mpm.P2G_BLOCK if self.device.startswith("cuda") else 1  # CPU runs one lane per block
        self._p2g_tiled = mpm.p2g_tiled(model.bspline, model.material, self._block) if self.p2g_mode == "tiled" else None
        n = self.particle_count
        self._order = wp.array(torch.arange(2 * n, dtype=torch.int32).numpy() % max(n, 1), dtype=int, device=self.device)
        self._keys = wp.zeros(2 * n, dtype=int, device=self.device)
        self._steps_since_sort = None
        self.density = (mass.detach().float() / volume.detach().to(mass.device).float()).view(-1)
        # grid nodes lighter than this are empty: 1e-8 of a mean particle, far below any node a particle reaches
        # with a real weight, and far enough above 0 that the adjoint of p / m stays finite in float32
        self.node_mass_eps = NODE_MASS_EPS * float(mass.detach().float().mean()) if self.particle_count else 0.0
        self._decision_mode, self._decisions = None, {}
        self._no_decisions = wp.zeros((1, 1, 1), dtype=int, device=self.device)

    def record_decisions(self) -> None:
        """From now on, rollouts record each step's grid-update decisions (contact, friction, separating walls,
        empty nodes) per node; ``replay_decisions()`` then makes every later rollout take the same branches, and
        ``forget_decisions()`` returns to deciding. The gradient checker uses this to compare autodiff with finite
        differences of the smooth piece a rollout with contact lies on (kernels/mpm.py grid_update)."""
        self._decision_mode, self._decisions = "record", {}

    def replay_decisions(self) -> None:
        if self._decision_mode is None:
            raise RuntimeError("no decisions were recorded")
        self._decision_mode = "replay"

    def forget_decisions(self) -> None:
        self._decision_mode, self._decisions = None, {}

    def _decision_args(self, step: int | None, taped: bool):
        """(mode, array) for the grid update of ``step``; untaped forward steps record, everything replays after."""
        from ..kernels import mpm

        wp = warp()
        if self._decision_mode is None or step is None:
            return mpm.DECIDE, self._no_decisions
        if self._decision_mode == "record" and not taped and step not in self._decisions:
            array = self._decisions[step] = wp.zeros(self.model.grid.shape, dtype=int, device=self.device)
            return mpm.DECIDE_AND_RECORD, array
        if step in self._decisions:
            return mpm.REPLAY, self._decisions[step]
        return mpm.DECIDE, self._no_decisions

    def new_state(self, requires_grad: bool = False) -> MPMState:
        return MPMState.zeros(self.particle_count, device=self.device, requires_grad=requires_grad)

    def new_grid(self, requires_grad: bool = False) -> MPMGrid:
        return MPMGrid.zeros(self.model.grid.shape, device=self.device, requires_grad=requires_grad)

    def sort_particles(self, state: MPMState) -> None:
        """Visiting order of the tiled P2G: particles by stencil cell (Warp's radix sort)."""
        wp = warp()
        from ..kernels import mpm

        g = self.model.grid
        shift = mpm.BSPLINES[self.model.bspline][1]
        n = self.particle_count
        wp.launch(mpm.cell_keys, dim=n, device=self.device, inputs=[self._lower, g.inv_dx, shift, g.shape[1],
                                                                    g.shape[2], state.x], outputs=[self._keys, self._order])
        wp.utils.radix_sort_pairs(self._keys, self._order, n)

    def launches(self, state_in: MPMState, state_out: MPMState, grid: MPMGrid, *, mu, lam, Fc, control: int,
                 clamped=None, J_min=None, taped: bool = True,
                 step: int | None = None) -> list[tuple[str, Callable[[], None]]]:
        """The launches of one step, in order, as (name, launch) pairs (the benchmark times them apart).

        ``step`` (the rollout's step index) keys recorded / replayed grid-update decisions (``record_decisions``).
        """
        wp = warp()
        m, g = self.model, self.model.grid
        n = self.particle_count
        inputs = [self._lower, g.dx, m.dt, self.volume, self.mass, mu, lam, m.bulk_viscosity, Fc, control]
        state = [state_in.x, state_in.v, state_in.F, state_in.C]
        fast = self.p2g_mode == "tiled" and not taped
        steps = []
        if fast and self.sort_every:
            due = self._steps_since_sort is None or self._steps_since_sort >= self.sort_every
            self._steps_since_sort = 1 if due else self._steps_since_sort + 1
            if due:
                steps.append(("sort", lambda: self.sort_particles(state_in)))

        def p2g():
            if fast:
                wp.launch_tiled(self._p2g_tiled, dim=[(n + self._block - 1) // self._block], block_dim=self._block,
                                device=self.device, inputs=[*inputs, self._order, *state],
                                outputs=[grid.mass, grid.momentum])
            else:
                wp.launch(self._p2g, dim=n, device=self.device, inputs=[*inputs, *state],
                          outputs=[grid.mass, grid.momentum])

        def grid_update():
            wp.launch(self._grid_update, dim=g.shape, device=self.device, inputs=[
                self._lower, g.dx, m.dt, wp.vec3(*m.gravity), g.boundary_cells, wp.vec3i(*m.walls_min),
                wp.vec3i(*m.walls_max), int(m.floor_enabled), wp.vec3(*m.floor_normal), m.floor_height, m.friction,
                self.node_mass_eps, grid.mass, grid.momentum, *self._decision_args(step, taped),
            ], outputs=[grid.velocity])

        def g2p():
            wp.launch(self._g2p, dim=n, device=self.device, inputs=[
                self._lower, g.dx, m.dt, self._interior[0], self._interior[1], m.f_blend, m.min_J, Fc, control,
                state_in.x, state_in.F, grid.velocity,
            ], outputs=[state_out.x, state_out.v, state_out.F, state_out.C,
                        clamped if clamped is not None else self.clamped, J_min if J_min is not None else self.J_min])

        return [*steps, ("p2g", p2g), ("grid_update", grid_update), ("g2p", g2p)]

    def step(self, state_in: MPMState, state_out: MPMState, grid: MPMGrid, *, mu, lam, Fc, control: int,
             clamped=None, J_min=None, taped: bool = True, step: int | None = None) -> None:
        """One MLS-MPM step from ``state_in`` into ``state_out`` through ``grid`` (which must be zero).

        ``taped=False`` (no tape recording) allows the faster tiled P2G. ``clamped`` / ``J_min``: where the step
        counts wall clamps and lowers each particle's lowest det F (default: the simulator's own records).
        """
        for _, launch in self.launches(state_in, state_out, grid, mu=mu, lam=lam, Fc=Fc, control=control,
                                       clamped=clamped, J_min=J_min, taped=taped, step=step):
            launch()


@dataclass
class RolloutStats:
    """What a rollout reports besides its states."""

    steps: int = 0
    segments: int = 0
    clamped_particle_steps: int = 0  # particle-steps held inside the interior (walls reached)
    det_F_min: torch.Tensor | None = None  # [N]: each particle's lowest det F over the rollout (start included)
    bytes_per_step: int = 0  # taped bytes per step in the backward (states, grids and their adjoints)
    peak_taped_bytes: int = 0  # largest segment held on a tape at once
    checkpoint_bytes: int = 0
    frames: list[int] = field(default_factory=list)


def _to_warp(tensor: torch.Tensor, dtype: str, requires_grad: bool):
    wp = warp()
    return wp.from_torch(tensor.detach().float().contiguous().clone(), dtype=getattr(wp, dtype),
                         requires_grad=requires_grad)


def _state_from_torch(state: MPMState, tensors) -> None:
    wp = warp()
    for array, tensor, dtype in zip(state.arrays(), tensors, STATE_DTYPES, strict=True):
        wp.copy(array, wp.from_torch(tensor.detach().float().contiguous(), dtype=getattr(wp, dtype)))


def _state_to_torch(state: MPMState) -> list[torch.Tensor]:
    wp = warp()
    return [wp.to_torch(a).clone() for a in state.arrays()]


class Rollout:
    """A differentiable rollout of ``steps`` steps returning the states at ``frames`` (the last is ``steps``)."""

    def __init__(self, sim: Simulator, *, steps: int, frames=(), segment_length: int | None = None):
        if any(f < 0 or f > steps for f in frames):
            raise SimulationError(f"frames must lie in 0..{steps}, got {sorted(frames)}")
        self.sim = sim
        self.steps = steps
        self.frames = sorted({*frames, steps})
        self.segments = segment_bounds(steps, self.frames, segment_length)
        self.stats = RolloutStats(steps=steps, segments=len(self.segments), frames=list(self.frames))
        self._checkpoints: list[list[torch.Tensor]] = []
        self._params = None

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, x0, v0, F0, C0, Fc, mu, lam) -> list[torch.Tensor]:
        """States at the frames, stacked: x [R, N, 3], v [R, N, 3], F [R, N, 3, 3], C [R, N, 3, 3]."""
        wp = warp()
        sim = self.sim
        controlled = Fc is not None
        K = sim.model.control_layers(self.steps)
        if controlled and tuple(Fc.shape) != (K, sim.particle_count, 3, 3):
            raise SimulationError(f"Fc must have shape [{K}, {sim.particle_count}, 3, 3], got {list(Fc.shape)}")
        fc = Fc if controlled else torch.eye(3, device=sim.torch_device).expand(1, sim.particle_count, 3, 3)
        self._params = dict(Fc=_to_warp(fc, "mat33", controlled), mu=_to_warp(mu, "float32", True),
                            lam=_to_warp(lam, "float32", True), controlled=controlled)
        current, spare = sim.new_state(), sim.new_state()
        _state_from_torch(current, (x0, v0, F0, C0))
        grid = sim.new_grid()
        sim.clamped.zero_()
        if sim.particle_count:
            wp.copy(sim.J_min, wp.from_torch(torch.linalg.det(F0.detach().float()).contiguous()))
        outputs = {0: _state_to_torch(current)} if 0 in self.frames else {}
        self._checkpoints = []
        for start, end in self.segments:
            self._checkpoints.append(_state_to_torch(current))
            for t in range(start, end):
                grid.zero_()
                sim.step(current, spare, grid, mu=self._params["mu"], lam=self._params["lam"],
                         Fc=self._params["Fc"], control=self._control(t), taped=False, step=t)
                current, spare = spare, current
            tensors = _state_to_torch(current)
            bad = [name for name, t in zip(MPMState.FIELDS, tensors, strict=True) if not torch.isfinite(t).all()]
            if bad:
                raise SimulationError(
                    f"non-finite particle state ({', '.join(bad)}) after step {end} (segment {start}..{end}); "
                    "lower sim.dt, soften the material or check the controls"
                )
            if end in self.frames:
                outputs[end] = tensors
        self.stats.clamped_particle_steps = int(sim.clamped.numpy()[0])
        self.stats.det_F_min = wp.to_torch(sim.J_min).clone()[:sim.particle_count]
        self._account_memory()
        return [torch.stack([outputs[f][i] for f in self.frames]) for i in range(4)]

    def _control(self, step: int) -> int:
        return self.sim.model.control_index(step) if self._params["controlled"] else -1

    def _account_memory(self) -> None:
        n, nodes = self.sim.particle_count, self.sim.model.grid.node_count
        state = n * (3 + 3 + 9 + 9) * 4
        grid = nodes * (1 + 3 + 3) * 4
        self.stats.bytes_per_step = 2 * (state + grid)
        self.stats.peak_taped_bytes = max(e - s for s, e in self.segments) * self.stats.bytes_per_step
        self.stats.checkpoint_bytes = len(self.segments) * state

    # -- backward -----------------------------------------------------------------------------------------------
    def backward(self, grads) -> tuple:
        """Gradients (x0, v0, F0, C0, Fc or None, mu, lam) from gradients of the stacked frame outputs."""
        wp = warp()
        sim = self.sim
        frame_row = {f: i for i, f in enumerate(self.frames)}
        carry = [torch.zeros_like(c) for c in self._checkpoints[-1]]
        scratch_counter = wp.zeros(1, dtype=int, device=sim.device)
        scratch_J = wp.zeros(max(sim.particle_count, 1), dtype=float, device=sim.device)
        for index in range(len(self.segments) - 1, -1, -1):
            start, end = self.segments[index]
            if end in frame_row:
                carry = [c + (g[frame_row[end]] if g is not None else 0) for c, g in zip(carry, grads, strict=True)]
            begin = sim.new_state(requires_grad=True)
            _state_from_torch(begin, self._checkpoints[index])
            tape = wp.Tape()
            current = begin
            with tape:
                for t in range(start, end):
                    nxt = sim.new_state(requires_grad=True)
                    sim.step(current, nxt, sim.new_grid(requires_grad=True), mu=self._params["mu"],
                             lam=self._params["lam"], Fc=self._params["Fc"], control=self._control(t),
                             clamped=scratch_counter, J_min=scratch_J, step=t)
                    current = nxt
            seeds = {array: wp.from_torch(g.float().contiguous(), dtype=getattr(wp, dtype))
                     for array, g, dtype in zip(current.arrays(), carry, STATE_DTYPES, strict=True)}
            tape.backward(grads=seeds)
            carry = [wp.to_torch(a.grad).clone() for a in begin.arrays()]
            # drop the tape without Tape.reset(): reset would also zero the parameter gradients accumulated so far
            del tape, begin, current, seeds
        if 0 in frame_row:
            carry = [c + (g[frame_row[0]] if g is not None else 0) for c, g in zip(carry, grads, strict=True)]
        p = self._params
        g_fc = wp.to_torch(p["Fc"].grad).clone() if p["controlled"] else None
        g_mu, g_lam = wp.to_torch(p["mu"].grad).clone(), wp.to_torch(p["lam"].grad).clone()
        self._params, self._checkpoints = None, []  # release Warp arrays (Warp issue #675)
        out = (*carry, g_fc, g_mu, g_lam)
        if not all(torch.isfinite(t).all() for t in out if t is not None):
            raise SimulationError("non-finite gradient in the MPM backward pass")
        return out
