"""The background grid and the stability numbers of a simulation (no Warp, no torch; values in, not scenes)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config.checks import grid_layout
from ..errors import SimulationError

FLOAT32_BYTES = 4
DECISION_BUDGET_BYTES = 1 << 30  # grid-update decisions a forward keeps for its backward (1 byte per node and step)


@dataclass(frozen=True)
class GridSpec:
    """A regular grid of ``shape`` nodes; node (i, j, k) sits at ``lower + (i, j, k) * dx`` [m].

    Particles live in the interior box ``[lower + band dx, lower + (shape - band) dx]`` so that no transfer stencil
    ever reaches outside the grid. The walls (kernels/mpm.py grid_update) hold the nodes on that box's faces (index
    band and shape - band) and every node outside it.
    """

    lower: tuple[float, float, float]
    dx: float
    shape: tuple[int, int, int]
    boundary_cells: int

    def __post_init__(self):
        # an interior on every axis: no node lies in the wall bands of both faces of an axis (the grid update
        # records one wall decision per axis, kernels/mpm.py)
        if min(self.shape) <= 2 * self.boundary_cells:
            raise ValueError(f"grid {self.shape} has no interior inside {self.boundary_cells} wall cells")

    @property
    def inv_dx(self) -> float:
        return 1.0 / self.dx

    @property
    def node_count(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]

    @property
    def interior_lower(self) -> tuple[float, float, float]:
        return tuple(lo + self.boundary_cells * self.dx for lo in self.lower)

    @property
    def interior_upper(self) -> tuple[float, float, float]:
        return tuple(lo + (n - self.boundary_cells) * self.dx for lo, n in zip(self.lower, self.shape))

    @property
    def center(self) -> tuple[float, float, float]:
        return tuple(lo + 0.5 * n * self.dx for lo, n in zip(self.lower, self.shape))

    @classmethod
    def from_sim(cls, sim) -> GridSpec:
        """Grid of a ``SimConfig``; raises ConfigError when the domain does not tile into cells of size dx
        (config.checks.grid_layout, which the loader has already run)."""
        layout = grid_layout(sim)
        return cls(lower=tuple(float(v) for v in sim.domain.lower), dx=layout.dx, shape=layout.cells,
                   boundary_cells=sim.boundary_cells)


def lame_parameters(E: float, nu: float) -> tuple[float, float]:
    """(mu, lambda) [Pa] from Young's modulus E [Pa] and Poisson ratio nu."""
    mu = E / (2.0 * (1.0 + nu))
    lam = E * nu / ((1.0 + nu) * (1.0 - 2.0 * nu))
    return mu, lam


def wave_speed(E: float, nu: float, density: float) -> float:
    """P-wave speed sqrt((lambda + 2 mu) / rho) [m/s]."""
    mu, lam = lame_parameters(E, nu)
    return math.sqrt(max(lam + 2.0 * mu, 0.0) / density)


def cfl_number(*, E: float, nu: float, density: float, dt: float, dx: float) -> float:
    """dt * sqrt((lambda + 2 mu) / rho) / dx: how many cells the fastest elastic wave crosses per step."""
    return dt * wave_speed(E, nu, density) / dx


def stable_dt(*, E: float, nu: float, density: float, dx: float, limit: float) -> float:
    """The largest dt [s] whose CFL number is ``limit``."""
    return limit * dx / wave_speed(E, nu, density)


def default_segment_length(steps: int) -> int:
    return max(1, round(math.sqrt(steps)))


def kept_frames(steps: int, frames=()) -> list[int]:
    """The steps a rollout of ``steps`` steps keeps, sorted: ``frames`` and the final step."""
    return sorted({*frames, steps})


def control_layers(steps: int, stride: int) -> int:
    """K = ceil(steps / stride): the control layers of a rollout (layer k acts at step k stride)."""
    return math.ceil(steps / stride)


def state_bytes(particle_count: int) -> int:
    """float32 bytes of one particle state: x, v (3 each), F, C (9 each), J_P (1) = 25 floats a particle."""
    return particle_count * 25 * FLOAT32_BYTES


def grid_bytes(node_count: int) -> int:
    """float32 bytes of one step's grid: (mass, momentum) and (velocity, 0), one vec4 each = 8 floats a node
    (sim/model.py MPMGrid)."""
    return node_count * 8 * FLOAT32_BYTES


@dataclass(frozen=True)
class RolloutMemory:
    """Estimated bytes of a taped rollout: forward states and their adjoints, per-step grids, controls."""

    per_step: int
    controls: int
    full_tape: int
    checkpointed: int
    segment_length: int
    decisions: int = 0  # the grid-update decisions the forward records for the backward (both estimates hold them)


def rollout_memory(*, particle_count: int, node_count: int, steps: int, control_layers: int,
                   segment_length: int | None) -> RolloutMemory:
    """Memory estimate of a differentiable rollout in float32.

    Per step the tape keeps one particle state (x, v: 3 each; F, C: 9 each; J_P: 1 = 25 floats) and one grid (mass,
    momentum and velocity as two vec4 = 8 floats per node); the backward needs an adjoint of each, so twice that. The
    controls dFc are [K, N, 3, 3] plus their gradient. Checkpointing keeps one state per segment and tapes one
    segment at a time. The forward records one byte of grid-update decisions per node and step, up to
    DECISION_BUDGET_BYTES (the backward re-records segments beyond it).
    """
    state = state_bytes(particle_count)
    per_step = 2 * (state + grid_bytes(node_count))
    controls = 2 * control_layers * particle_count * 9 * FLOAT32_BYTES
    seg = segment_length or default_segment_length(steps)
    seg = min(seg, steps)
    decisions = min(steps * node_count, DECISION_BUDGET_BYTES)
    full = steps * per_step + controls + decisions
    checkpointed = math.ceil(steps / seg) * state + seg * per_step + controls + decisions
    return RolloutMemory(per_step=per_step, controls=controls, full_tape=full, checkpointed=checkpointed,
                         segment_length=seg, decisions=decisions)


def check_cfl_number(*, dt: float, dx: float, speed: float, limit: float, detail: str) -> float:
    """dt * speed / dx; raises SimulationError naming a stable dt when it exceeds ``limit`` (or is not finite)."""
    cfl = dt * speed / dx
    if not cfl <= limit:
        raise SimulationError(
            f"sim.dt: unstable time step: CFL number {above(cfl, limit)} exceeds sim.cfl_limit {limit!r} ({detail}, "
            f"dx = {dx:.4g} m); dt <= {rounded_down(limit * dx / speed)} s would be stable"
        )
    return cfl


def rounded_down(value: float, digits: int = 3) -> str:
    """``value`` >= 0 to ``digits`` significant digits, rounded towards zero (a bound that stays true when read)."""
    if not (math.isfinite(value) and value > 0):
        return f"{value:g}"
    unit = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return f"{math.floor(value / unit) * unit:.{digits}g}"


def above(value: float, limit: float) -> str:
    """``value`` (> ``limit``) with 3 significant digits, or as many more as it takes to read larger than ``limit``."""
    for digits in range(3, 18):
        text = f"{value:.{digits}g}"
        if not float(text) <= limit:
            return text
    return repr(value)


def fastest_material(starts) -> tuple[float, float, float]:
    """The (E, nu, density) of ``starts`` (config.checks.material_starts) with the fastest P wave."""
    return max(starts, key=lambda start: wave_speed(*start))


def check_cfl(*, E: float, nu: float, density: float, dt: float, dx: float, limit: float) -> float:
    """The CFL number of a material (E [Pa], nu, density [kg/m^3]) at ``dt`` [s] on cells of ``dx`` [m];
    SimulationError above ``limit`` (``sim.cfl_limit``). For a scene, E, nu and density are those of
    fastest_material(config.checks.material_starts(scene)).
    """
    return check_cfl_number(dt=dt, dx=dx, speed=wave_speed(E, nu, density), limit=limit,
                            detail=f"E = {E:.4g} Pa, nu = {nu:g}, density = {density:g} kg/m^3")

