"""The torch <-> Warp boundary of the simulation: one autograd.Function for the rollout, one for grid mass."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..enums import Material
from ..errors import SimulationError
from ..warp_runtime import torch_stream, warp, warp_device
from .graphs import make_rollout
from .grid import GridSpec, check_cfl_number, lame_parameters
from .solver import DECISION_BUDGET_BYTES, FrozenDecisions, Rollout, RolloutStats, Simulator


class _RolloutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rollout: Rollout, x0, v0, F0, C0, Fc, mu, lam, kappa, Jp0):
        with torch_stream(x0.device):
            outputs = rollout.forward(x0, v0, F0, C0, Fc, mu, lam, kappa, Jp0)
        ctx.rollout = rollout
        return tuple(outputs)

    @staticmethod
    def backward(ctx, gx, gv, gF, gC, gJp):
        rollout, ctx.rollout = ctx.rollout, None
        with torch_stream(gx.device):
            grads = rollout.backward([gx, gv, gF, gC, gJp])
        return (None, *grads)


@dataclass
class RolloutResult:
    """States at ``frames`` (steps): x [R, N, 3] m, v [R, N, 3] m/s, F [R, N, 3, 3], C [R, N, 3, 3] 1/s and the
    plastic volume ratio Jp [R, N] (snow's J_P; the start's value, 1 by default, for every other model)."""

    x: torch.Tensor
    v: torch.Tensor
    F: torch.Tensor
    C: torch.Tensor
    frames: list[int]
    stats: RolloutStats
    Jp: torch.Tensor | None = None

    def at(self, step: int) -> dict[str, torch.Tensor]:
        row = self.frames.index(step)
        out = {"x": self.x[row], "v": self.v[row], "F": self.F[row], "C": self.C[row]}
        if self.Jp is not None:
            out["Jp"] = self.Jp[row]
        return out


def drucker_prager_alpha(friction_angle: torch.Tensor) -> torch.Tensor:
    """alpha = sqrt(2/3) 2 sin(phi) / (3 - sin(phi)) of the friction angle phi [degrees] (Klar et al. 2016)."""
    s = torch.sin(torch.deg2rad(friction_angle))
    return (2.0 / 3.0) ** 0.5 * 2.0 * s / (3.0 - s)


def drucker_prager_apex(cohesion: torch.Tensor, friction_angle: torch.Tensor) -> torch.Tensor:
    """a = c cot(phi) [Pa]: the mean Kirchhoff stress of the Drucker-Prager cone's apex (Mohr-Coulomb cohesion c [Pa]
    moves it from 0 into tension), of the friction angle phi [degrees]; the kernels' kappa[1]."""
    return cohesion / torch.tan(torch.deg2rad(friction_angle))


MATERIAL_PARAMETERS = ("yield_stress", "friction_angle", "cohesion", "viscosity", "hardening", "critical_compression",
                       "critical_stretch", "flow_index")  # every model's parameters beside E and nu (enums.MODEL_PARAMETERS)
# a model's parameters that may be left out: bingham's N = 1 is Bingham, drucker_prager without cohesion is Klar's
PARAMETER_DEFAULTS = {"flow_index": 1.0, "cohesion": 0.0}
KAPPA_WIDTH = 3  # the kernels' per-particle parameter vector (vec3)


def material_kappa(material: Material, *, count: int, device, **given: torch.Tensor | None) -> torch.Tensor:
    """The kernels' per-particle parameter vector [N, 3] (differentiable), the model's parameters in the order of
    ``Material.parameters`` (zeros after them): yield stress [Pa] (von_mises), (alpha of the friction angle
    [degrees], the apex a = c cot(phi) [Pa] of the cohesion c [Pa], default 0) (drucker_prager), dynamic viscosity
    [Pa s] (newtonian_fluid), (hardening xi, critical compression theta_c, critical stretch theta_s) (snow), (yield
    stress [Pa], viscosity or consistency K [Pa s^N], flow index N) (bingham; N = 1 when not given: Bingham); zeros
    for elastic models. Each may be [] or [N]. The model's own parameters are required (but those of
    ``PARAMETER_DEFAULTS``); another model's are refused (they would silently do nothing)."""
    material = Material(material)
    unknown = [name for name in given if name not in MATERIAL_PARAMETERS]
    if unknown:
        raise TypeError(f"material_kappa() got an unexpected keyword argument {unknown[0]!r}")
    needed = material.parameters
    stray = [name for name, value in given.items() if value is not None and name not in needed]
    if stray:
        raise SimulationError(f"material model {material.value} has no parameter {stray[0]}")
    columns = []
    for name in needed:
        value = given.get(name)
        if value is None and name in PARAMETER_DEFAULTS:
            value = torch.tensor(PARAMETER_DEFAULTS[name])
        if value is None:
            raise SimulationError(f"material model {material.value} needs {name}")
        if name == "friction_angle":
            value = drucker_prager_alpha(value)
        elif name == "cohesion":
            value = drucker_prager_apex(value.to(device), given["friction_angle"].to(device))
        columns.append(value.to(device).expand(count))
    dtype = columns[0].dtype if columns else torch.float32
    columns = [c.to(dtype) for c in columns]
    columns += [torch.zeros(count, device=device, dtype=dtype)] * (KAPPA_WIDTH - len(columns))
    return torch.stack(columns, dim=-1)


def scene_kappa(models, model_code: torch.Tensor, *, count: int, device, **given: torch.Tensor | None) -> torch.Tensor:
    """The kernels' per-particle parameter vector [N, 3] of a scene of several models: each particle's row packed by
    its own model's ``material_kappa`` (model_code [N]: the index of its model in ``models``). ``given``: every
    present model's parameters, each [] or [N] (a parameter two models share, such as yield_stress of von_mises and
    bingham, carries each particle's own value); a parameter no present model has is refused, one a present model
    needs is required."""
    models = tuple(Material(m) for m in models)
    if len(models) == 1:
        return material_kappa(models[0], count=count, device=device, **given)
    wanted = {name for m in models for name in m.parameters}
    stray = [name for name, value in given.items() if value is not None and name not in wanted]
    if stray:
        raise SimulationError(f"no material model of this scene ({', '.join(m.value for m in models)}) has a parameter "
                              f"{stray[0]}")
    code = model_code.to(device)
    rows = [material_kappa(model, count=count, device=device, **{k: given.get(k) for k in model.parameters})
            for model in models]
    dtype = functools.reduce(torch.promote_types, (r.dtype for r in rows))
    kappa = rows[0].to(dtype)
    for index, row in enumerate(rows[1:], start=1):
        kappa = torch.where((code == index)[:, None], row.to(dtype), kappa)
    return kappa


def simulate(sim: Simulator, *, x0: torch.Tensor, v0: torch.Tensor, E: torch.Tensor, nu: torch.Tensor,
             steps: int, Fc: torch.Tensor | None = None, F0: torch.Tensor | None = None,
             C0: torch.Tensor | None = None, Jp0: torch.Tensor | None = None, frames=(),
             segment_length: int | None = None, decision_budget: int = DECISION_BUDGET_BYTES,
             frozen: FrozenDecisions | None = None, **material: torch.Tensor | None) -> RolloutResult:
    """Differentiable rollout of ``steps`` steps.

    x0 [N, 3] m; v0 [3] or [N, 3] m/s; E [] or [N] Pa; nu [] or [N]; the model's own parameters (``material``,
    each [] or [N]): yield_stress [Pa] (von_mises, bingham), friction_angle [degrees] and cohesion [Pa, default 0]
    (drucker_prager), viscosity [Pa s] (newtonian_fluid; bingham: the consistency K [Pa s^N]), flow_index N (bingham,
    default 1), hardening, critical_compression, critical_stretch (snow); Fc [K, N, 3, 3]
    multiplicative controls (F~ = Fc[k] F at step k stride) with K = ceil(steps / stride) (None: no controls); F0, C0
    [N, 3, 3] (default I and 0); Jp0 [N] the plastic volume ratio (snow; default 1). Gradients reach every tensor
    input that requires them, through one backward sweep over checkpointed segments that takes the forward's
    branches (recorded up to ``decision_budget`` bytes, see Rollout).
    ``frozen``: decisions kept across rollouts (``FrozenDecisions``: replayed where held, recorded where not).
    """
    n = x0.shape[0]
    device = x0.device
    v0 = v0.expand(n, 3)
    F0 = F0 if F0 is not None else torch.eye(3, device=device).expand(n, 3, 3)
    C0 = C0 if C0 is not None else torch.zeros(n, 3, 3, device=device)
    Jp0 = Jp0 if Jp0 is not None else torch.ones(n, device=device)
    mu, lam = lame_parameters(E, nu)
    mu, lam = mu.expand(n), lam.expand(n)
    kappa = scene_kappa(sim.model.models, sim.model_code, count=n, device=device, **material)
    _check_stability(sim, mu, lam, kappa, Jp0)
    rollout = make_rollout(sim, steps=steps, frames=frames, segment_length=segment_length,
                           decision_budget=decision_budget, frozen=frozen, controlled=Fc is not None)
    x, v, F, C, Jp = _RolloutFunction.apply(rollout, x0, v0, F0, C0, Fc, mu, lam, kappa, Jp0)
    if not x.requires_grad:
        rollout.release()
    return RolloutResult(x=x, v=v, F=F, C=C, frames=rollout.frames, stats=rollout.stats, Jp=Jp)


def _check_stability(sim: Simulator, mu: torch.Tensor, lam: torch.Tensor, kappa: torch.Tensor,
                     Jp0: torch.Tensor | None = None) -> None:
    """Refuse a rollout whose CFL number dt sqrt((lambda + 2 mu) / rho) / dx exceeds the model's limit; for a fluid
    also one whose viscous number dt eta / (rho dx^2) (explicit viscosity, a diffusion of momentum) does.

    Snow's mu and lam are scaled by exp(xi (1 - J_P)): its wave speeds are those of each particle's J_P0, the state
    the rollout starts from (1 for fresh snow; an optimisation episode's carried compaction). Compaction during the
    rollout stiffens it further, and the model bounds that by nothing (J_P only shrinks while compressed: 0.12 in
    snowball_impact at xi 3), so no check before a run can hold for the stiffest state (docs/MATERIALS.md)."""
    modulus = (lam + 2 * mu).detach()
    hardening = None
    snowy = sim.snow_particles(modulus.device)
    if snowy is not None and Jp0 is not None and sim.particle_count:
        hardening = torch.where(snowy, torch.exp(kappa[:, 0].detach() * (1 - Jp0.detach().to(modulus.device,
                                                                                              modulus.dtype))), 1.0)
        modulus = modulus * hardening
    speeds = torch.sqrt(torch.clamp(modulus / sim.density, min=0.0))
    speed, fastest, hardened = 0.0, 0, 1.0
    if speeds.numel():  # one copy to the host: the largest speed (NaN if any), where, and its snow hardening
        where = torch.argmax(torch.nan_to_num(speeds, nan=float("inf")))
        values = [speeds.max(), where, hardening[where] if hardening is not None else speeds.new_ones(())]
        speed, fastest, hardened = torch.stack([v.double() for v in values]).tolist()
        fastest = int(fastest)
    detail = f"largest wave speed {speed:.4g} m/s"
    if hardened != 1.0:
        detail += f", snow hardened x{hardened:.3g} by exp(xi (1 - J_P)) at its J_P {float(Jp0[fastest].detach()):.3g}"
    check_cfl_number(dt=sim.model.dt, dx=sim.model.grid.dx, speed=speed, limit=sim.model.cfl_limit, detail=detail)
    if Material.NEWTONIAN_FLUID in sim.model.models and sim.particle_count:
        fluid = sim.model_code.to(kappa.device) == sim.model.models.index(Material.NEWTONIAN_FLUID)
        number = float((kappa[fluid, 0].detach() / sim.density.to(kappa.device)[fluid]).max()) * sim.model.dt \
            / sim.model.grid.dx**2
        if number > VISCOUS_LIMIT:
            raise SimulationError(f"unstable time step: viscous number dt eta / (rho dx^2) = {number:.3g} exceeds "
                                  f"{VISCOUS_LIMIT}; lower sim.dt below {sim.model.dt * VISCOUS_LIMIT / number:.3g} s "
                                  "or the viscosity")


# explicit viscosity: dt eta / (rho dx^2) at most this. Measured on the dam break of tests/test_materials.py
# (quadratic B-spline): stable and energy-decreasing up to 0.3, non-finite within 60 steps at 0.5; 0.1 keeps a margin
VISCOUS_LIMIT = 0.1


class _GridMassFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, positions, masses, grid: GridSpec, bspline: str):
        wp = warp()
        from ..kernels import mpm

        device = positions.device
        x = wp.from_torch(positions.detach().float().contiguous().clone(), dtype=wp.vec3, requires_grad=True)
        m = wp.from_torch(masses.detach().to(device).float().contiguous().clone(), requires_grad=True)
        out = wp.zeros(grid.shape, dtype=float, device=warp_device(device), requires_grad=True)
        tape = wp.Tape()
        with torch_stream(device), tape:
            if x.shape[0]:
                wp.launch(mpm.p2g_mass[bspline], dim=x.shape[0], inputs=[wp.vec3(*grid.lower), grid.inv_dx, x, m],
                          outputs=[out], device=warp_device(device))
        ctx.saved = (tape, x, m, out)
        return wp.to_torch(out).clone()

    @staticmethod
    def backward(ctx, grad_mass):
        wp = warp()
        tape, x, m, out = ctx.saved
        ctx.saved = None
        with torch_stream(grad_mass.device):
            tape.backward(grads={out: wp.from_torch(grad_mass.float().contiguous())})
            gx, gm = wp.to_torch(x.grad).clone(), wp.to_torch(m.grad).clone()
        del tape
        return gx, gm, None, None


def grid_mass(positions: torch.Tensor, masses: torch.Tensor, *, grid: GridSpec, bspline: str) -> torch.Tensor:
    """Differentiable grid mass [nx, ny, nz] (kg) of particles at ``positions`` [N, 3] (m) with ``masses`` [N] (kg).

    Transfers with the quadratic (27-node) or cubic (64-node) B-spline. Particles must lie in the grid interior
    (``GridSpec.interior_*``); a stencil that would leave the grid is clamped to its edge.
    """
    return _GridMassFunction.apply(positions, masses, grid, bspline)
