"""Thin launchers of one MLS-MPM step's kernels (``kernels/mpm.py``): ``p2g``, ``grid_update``, ``g2p``.

Each takes the static model, the arrays it reads and the arrays it writes, names every kernel argument in the
kernel's own order, and translates the host's enums (WallKind, DecisionMode) into ints here, at the kernel
boundary. Nothing here keeps state between calls.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..enums import DecisionMode
from ..warp_runtime import warp, warp_device
from .model import MPMGrid, MPMModel, MPMState


@dataclass(frozen=True)
class Particles:
    """Per-particle constants of a body: mass [N] kg and rest volume [N] m^3 (Warp float arrays on ``device``) and
    model code [N] (int: the index of each particle's constitutive model in ``MPMModel.models``; [1] zeros when not
    given: a one-model scene's kernels never read it)."""

    mass: object
    volume: object
    count: int
    device: str
    model_code: object = None

    @classmethod
    def from_torch(cls, mass: torch.Tensor, volume: torch.Tensor, model_code: torch.Tensor | None = None) -> Particles:
        wp = warp()
        count = int(mass.shape[0])
        code = (torch.zeros(1, dtype=torch.int32, device=mass.device) if model_code is None or not count
                else model_code.detach().to(mass.device, torch.int32).contiguous().clone())
        return cls(mass=wp.from_torch(mass.detach().float().contiguous().clone()),
                   volume=wp.from_torch(volume.detach().to(mass.device).float().contiguous().clone()),
                   count=count, device=warp_device(mass.device), model_code=wp.from_torch(code))


@functools.cache
def _no_codes(device: str):
    """The model-code array passed where a one-model scene's kernels never read it (one per device)."""
    return warp().zeros(1, dtype=int, device=device)


@functools.cache
def _no_trials(device: str):
    """The F_trial record passed to a G2P that never reads it (one per device)."""
    return warp().zeros(1, dtype=warp().mat33, device=device)


@functools.cache
def _no_decisions(device: str, ndim: int = 3):
    """The decision array passed when nothing is recorded or replayed (one per device and dimension)."""
    wp = warp()
    from ..kernels import mpm

    return wp.zeros((1,) * ndim, dtype=mpm.DECISION_DTYPE, device=device)


def _adjoints(tape, arrays) -> list:
    """The tape's adjoint of each of ``arrays`` (the split backwards' adjoint launches take them)."""
    return [tape.get_adjoint(a) for a in arrays]


def p2g(model: MPMModel, particles: Particles, state_in: MPMState, grid: MPMGrid, *, mu, lam, kappa, Fc,
        control: int, tape=None, affine=None) -> None:
    """Scatter mass and APIC/MLS momentum (with the stress of F~ = Fc[control] F) into ``grid`` (which must be 0).

    mu, lam: [N] float arrays (Pa); kappa: [N] vec3 array, the model's parameter vector (sim/op.py material_kappa;
    unused by elastic models); Fc: [K, N] mat33 controls; control: the layer applied this step, or -1.

    ``tape``: the ``wp.Tape`` recording this launch (with ``affine``, a [N] mat33 array with a gradient, reused by
    every step): its backward then runs as two kernels, the stress's generated adjoint apart from the scatter's
    hand-written one (kernels/mpm.py p2g_affine, p2g_transfer), instead of the fused kernel's generated adjoint, which
    is slower (BENCHMARKS.md). A tape that records the launch itself (no ``tape`` given) differentiates the fused
    kernel: the same gradient."""
    wp = warp()
    from ..kernels import mpm

    g, k, n, device = model.grid, model.kernel_constants, particles.count, particles.device
    codes = particles.model_code if particles.model_code is not None else _no_codes(device)
    wp.launch(mpm.p2g(model.bspline, model.models), dim=n, device=device, inputs=[
        k.lower, g.dx, model.dt, particles.volume, particles.mass, mu, lam, kappa, codes, model.bulk_viscosity,
        Fc, control,
        state_in.x, state_in.v, state_in.F, state_in.C, state_in.Jp,
    ], outputs=[grid.mass_momentum], record_tape=tape is None)
    if tape is None:
        return
    stress_inputs = [g.dx, model.dt, particles.volume, particles.mass, mu, lam, kappa, codes, model.bulk_viscosity, Fc,
                     control, state_in.F, state_in.C, state_in.Jp]
    affine_kernel = mpm.p2g_affine(model.bspline, model.models)
    transfer_inputs = [k.lower, g.dx, particles.mass, state_in.x, state_in.v, affine]

    def backward():
        adjoints = functools.partial(_adjoints, tape)
        wp.launch(affine_kernel, dim=n, device=device, inputs=stress_inputs, outputs=[affine],
                  record_tape=False)
        affine.grad.zero_()
        wp.launch(mpm.p2g_transfer[model.bspline], dim=n, device=device, inputs=transfer_inputs,
                  outputs=[grid.mass_momentum], adj_inputs=adjoints(transfer_inputs),
                  adj_outputs=[grid.mass_momentum.grad], adjoint=True, record_tape=False)
        wp.launch(affine_kernel, dim=n, device=device, inputs=stress_inputs, outputs=[affine],
                  adj_inputs=adjoints(stress_inputs), adj_outputs=[affine.grad], adjoint=True, record_tape=False)

    tape.record_func(backward, arrays=[grid.mass_momentum])


def grid_update(model: MPMModel, grid: MPMGrid, *, node_mass_eps: float, device: str,
                mode: DecisionMode = DecisionMode.DECIDE, decisions=None) -> None:
    """Grid velocities from mass and momentum: gravity, floor contact with friction, walls.

    ``mode`` RECORD writes each node's branch decisions into ``decisions`` (a uint8 array of the grid's shape),
    REPLAY takes them from it; DECIDE needs none."""
    wp = warp()
    from ..kernels import mpm

    g, k = model.grid, model.kernel_constants
    if mode != DecisionMode.DECIDE and decisions is None:
        raise ValueError(f"decision mode {mode.name} needs a decision array")
    if mode == DecisionMode.LINEARISE:  # nothing to linearise on the grid: its branches are replayed
        mode = DecisionMode.REPLAY
    threads = mpm.box_threads(wp.get_device(device))
    wp.launch(mpm.grid_update, dim=threads, device=device, inputs=[
        k.lower, g.dx, model.dt, k.gravity, g.boundary_cells, k.walls_min, k.walls_max,
        int(model.floor_enabled), k.floor_normal, model.floor_height, model.friction, node_mass_eps,
        grid.mass, grid.momentum,
        int(mode), decisions if decisions is not None else _no_decisions(device),
        grid.box, mpm.BSPLINES[model.bspline][0], threads,
    ], outputs=[grid.velocity])


def nonfinite_fields(state: MPMState, flags, *, row: int, count: int, device: str) -> None:
    """Set ``flags[row, f]`` (int [rows, 5], zeroed by the caller) where field f of the first ``count`` particles of
    ``state`` (MPMState.FIELDS) is not finite. Not taped."""
    wp = warp()
    from ..kernels import mpm

    if count:
        wp.launch(mpm.nonfinite_fields, dim=count, device=device, inputs=[*state.arrays(), row], outputs=[flags],
                  record_tape=False)


def particle_box(model: MPMModel, state_in: MPMState, grid: MPMGrid, *, device: str) -> None:
    """The box of nodes the particles' stencils reach into ``grid.box`` (emptied by ``grid.zero_()``), which the grid
    update visits alone. Not differentiable (integer), never taped."""
    wp = warp()
    from ..kernels import bounds

    g, k = model.grid, model.kernel_constants
    wp.launch(bounds.particle_box(model.bspline), dim=state_in.x.shape[0], device=device, inputs=[
        k.lower, g.dx, wp.vec3i(*g.shape), state_in.x,
    ], outputs=[grid.box], record_tape=False)
    wp.launch(bounds.box_reduce, dim=6 * bounds.BOX_SLOTS, device=device, inputs=[grid.box], record_tape=False)


def g2p(model: MPMModel, state_in: MPMState, grid: MPMGrid, state_out: MPMState, *, mu, lam, kappa, Fc,
        control: int, clamped, J_min, device: str, mode: DecisionMode = DecisionMode.DECIDE,
        decisions=None, model_code=None, trials=None, tape=None) -> None:
    """Gather v and C from the grid, update F (then the material's return mapping, which reads mu, lam, kappa as
    ``p2g`` does), J_P (snow; the others copy it) and x into ``state_out``; count wall clamps into ``clamped`` [1]
    and lower each particle's lowest det F in ``J_min`` [N] (validity records, not differentiated). ``mode`` RECORD
    writes each particle's return-mapping branch into ``decisions`` (uint8 [N]), REPLAY takes it from there (plastic
    models). ``model_code``: each particle's model (``Particles.model_code``; needed where ``model.models`` holds
    several).

    ``trials`` (mat33 [N], a scene with snow; check-grad's frozen rollouts): RECORD also writes each particle's F_trial
    there, and LINEARISE (which needs it) replays the branches with snow's return mapping linearised at it
    (kernels/mpm.py snow_linearised), through G2P's linearised variant. Rollouts launch LINEARISE untaped: their
    backward replays (REPLAY) the true map.

    ``tape``: the ``wp.Tape`` recording this launch: its backward then runs as two kernels, as P2G's does, the
    generated adjoint of everything after the gather (reading the gathered v and C from ``state_out``) and then the
    gather's hand-written one (kernels/mpm.py g2p_update, g2p_gather), instead of the fused kernel's generated adjoint.
    A tape that records the launch itself (no ``tape`` given) differentiates the fused kernel: the same gradient."""
    wp = warp()
    from ..kernels import mpm

    if mode != DecisionMode.DECIDE and decisions is None:
        raise ValueError(f"decision mode {mode.name} needs a decision array")
    if mode == DecisionMode.LINEARISE and trials is None:
        raise ValueError("decision mode LINEARISE needs the recorded F_trial")
    if model_code is None and model.mixed:
        raise ValueError("a scene of several models needs each particle's model code")
    g, k = model.grid, model.kernel_constants
    linearised = trials is not None and mode in (DecisionMode.RECORD, DecisionMode.LINEARISE)
    split = tape is not None and not linearised
    n = state_in.x.shape[0]
    codes = model_code if model_code is not None else _no_codes(device)
    branches = [int(mode), decisions if decisions is not None else _no_decisions(device, 1),
                trials if linearised else _no_trials(device)]
    material = [model.f_blend, model.min_J, mu, lam, kappa, codes, Fc, control]
    wp.launch(mpm.g2p(model.bspline, model.models, linearised), dim=n, device=device, inputs=[
        k.lower, g.dx, model.dt, k.interior_lower, k.interior_upper, *material,
        state_in.x, state_in.F, state_in.Jp, grid.velocity4, *branches,
    ], outputs=[state_out.x, state_out.v, state_out.F, state_out.C, state_out.Jp, clamped, J_min],
        record_tape=not split)
    if not split:
        return
    update_inputs = [model.dt, k.interior_lower, k.interior_upper, *material,
                     state_in.x, state_in.F, state_in.Jp, state_out.v, state_out.C, *branches]
    update_outputs = [state_out.x, state_out.F, state_out.Jp, clamped, J_min]
    gather_inputs = [k.lower, g.dx, state_in.x, grid.velocity4]

    def backward():
        adjoints = functools.partial(_adjoints, tape)
        # v and C: their gradient from later steps, plus what x, F and the return mapping add (g2p_update's adjoint
        # adds into the same arrays), is the gradient the gather's adjoint takes
        wp.launch(mpm.g2p_update(model.models), dim=n, device=device, inputs=update_inputs,
                  outputs=update_outputs, adj_inputs=adjoints(update_inputs), adj_outputs=adjoints(update_outputs),
                  adjoint=True, record_tape=False)
        gather_outputs = [state_out.v, state_out.C]
        wp.launch(mpm.g2p_gather[model.bspline], dim=n, device=device, inputs=gather_inputs, outputs=gather_outputs,
                  adj_inputs=adjoints(gather_inputs), adj_outputs=adjoints(gather_outputs), adjoint=True,
                  record_tape=False)

    tape.record_func(backward, arrays=[state_out.x, state_out.v, state_out.F, state_out.C, state_out.Jp])
