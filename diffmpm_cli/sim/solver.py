"""MPM step launches and the checkpointed rollout (forward without a tape, backward segment by segment).

The forward keeps only the states at segment starts. The backward replays each segment, last first, under a
fresh ``wp.Tape`` with one state and one grid per step (nothing a taped launch read is ever overwritten), seeds
the segment end with the gradient arriving from later segments plus that of any output frame there, and passes
the gradient of the segment's start state on. All control layers, E/nu and the initial state get their
gradients from this single backward sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..enums import DecisionMode, P2GMode
from ..errors import SimulationError
from ..warp_runtime import warp
from . import launch
from .grid import DECISION_BUDGET_BYTES, default_segment_length, grid_bytes, kept_frames, state_bytes
from .launch import Particles
from .model import MPMGrid, MPMModel, MPMState
from .tiled import TiledP2G

STATE_DTYPES = ("vec3", "vec3", "mat33", "mat33", "float32")
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


@dataclass(frozen=True)
class StepDecisions:
    """One step's branch decisions: grid uint8 [nx, ny, nz] (grid update) and particles uint8 [N] (return mapping
    of a plastic model; None otherwise); trials mat33 [N]: each particle's F_trial, recorded for snow's linearised
    replay (``FrozenDecisions(linearise=True)`` in a scene with snow; None otherwise)."""

    grid: object
    particles: object | None
    trials: object | None = None


@dataclass(frozen=True)
class DecisionBlock:
    """Decisions of several steps; ``block[row]`` is one step's ``StepDecisions``."""

    grid: object
    particles: object | None
    trials: object | None = None

    def __getitem__(self, row: int) -> StepDecisions:
        return StepDecisions(self.grid[row], self.particles[row] if self.particles is not None else None,
                             self.trials[row] if self.trials is not None else None)


class FrozenDecisions:
    """Branch decisions kept across rollouts, owned by the caller and passed to each rollout (``simulate(...,
    frozen=...)``): a rollout records every step this does not hold yet (no budget) and replays every step it holds.
    The gradient checker's view of rollouts with contact and yield as the smooth piece the first one lies on: its
    base rollout records, every probe replays.

    ``linearise`` (a scene with snow): the recording rollout also keeps each particle's F_trial (36 bytes a
    particle-step), and the replaying rollouts' forwards take snow's return mapping linearised there
    (DecisionMode.LINEARISE): G(F*) + dG(F*)[F_trial - F*]. Snow's clamp changes its derivative by O(1) between
    singular values a few 1e-4 apart (one inside, one beyond a bound), so central differences of the true rollout
    over any resolvable step measure a chord; those of the linearised one measure the derivative, which equals the
    true rollout's at the base (docs/MATERIALS.md). The base rollout is the true one (bit-equal), and every backward
    replays the true map and its adjoint."""

    def __init__(self, linearise: bool = True):
        self.steps: dict[int, StepDecisions] = {}
        self.linearise = linearise

    def __contains__(self, step: int) -> bool:
        return step in self.steps


class Simulator:
    """One model and one set of particles (mass [N] kg, rest volume [N] m^3): what every step of a rollout needs.

    ``p2g``: ``P2GMode.PLAIN`` (the default, and the only path any taped step takes) or ``P2GMode.TILED`` (untaped
    forward steps through the shared-memory speed path of ``sim/tiled.py``, re-sorting particles by cell every
    ``sort_every`` steps; used by ``diffmpm bench``).

    ``graphs``: whether differentiable rollouts may replay captured graphs over arrays kept across rollouts
    (``sim/graphs.py``; the same results, without the host's per-launch work) instead of launching eagerly.

    Branch decisions (the grid update's; for a plastic model also each particle's return-mapping branch: elastic,
    yield, tension): every differentiable rollout records them in its forward and replays them in its backward
    (``Rollout``); a caller's ``FrozenDecisions`` keeps them across rollouts. The Simulator holds no rollout state.
    """

    def __init__(self, model: MPMModel, *, mass: torch.Tensor, volume: torch.Tensor,
                 model_code: torch.Tensor | None = None, p2g: P2GMode | str = P2GMode.PLAIN, sort_every: int = 0,
                 graphs: bool = True):
        wp = warp()
        self.model = model
        count = int(mass.shape[0])
        if model_code is None and model.mixed:
            raise SimulationError(f"a scene of several models ({', '.join(m.value for m in model.models)}) needs each "
                                  "particle's model code")
        # each particle's constitutive model: its index in model.models [N] (int64, on mass's device)
        self.model_code = (torch.zeros(count, dtype=torch.int64, device=mass.device) if model_code is None
                           else model_code.detach().to(mass.device, torch.int64).reshape(-1))
        if self.model_code.numel() != count or (count and not (
                (self.model_code >= 0) & (self.model_code < len(model.models))).all()):
            raise SimulationError(f"model_code must hold {count} indices into the model's {len(model.models)} models")
        self.graphs = graphs
        self.rollout_cache = None  # sim/graphs.py: arrays and captured programs kept across rollouts
        self._affine = None  # P2G's split backward's scratch (_affine_scratch)
        self.particles = Particles.from_torch(mass, volume, self.model_code if model.mixed else None)
        self.device = self.particles.device
        self.torch_device = mass.device
        self.particle_count = self.particles.count
        self.clamped = wp.zeros(1, dtype=int, device=self.device)
        self.J_min = wp.zeros(max(self.particle_count, 1), dtype=float, device=self.device)  # lowest det F per particle
        self.p2g_mode = P2GMode(p2g)
        self.tiled = TiledP2G(model, self.particles, sort_every=sort_every) if self.p2g_mode == P2GMode.TILED else None
        self.density = (mass.detach().float() / volume.detach().to(mass.device).float()).view(-1)
        # grid nodes lighter than this are empty: 1e-8 of a mean particle, far below any node a particle reaches
        # with a real weight, and far enough above 0 that the adjoint of p / m stays finite in float32
        self.node_mass_eps = NODE_MASS_EPS * float(mass.detach().float().mean()) if self.particle_count else 0.0

    def _affine_scratch(self):
        """P2G's split backward's affine [N] mat33 array and gradient (launch.p2g), allocated on first use."""
        if self._affine is None:
            self._affine = warp().zeros(max(self.particle_count, 1), dtype=warp().mat33, device=self.device,
                                        requires_grad=True)
        return self._affine

    @property
    def sort_every(self) -> int:
        return self.tiled.sort_every if self.tiled is not None else 0

    # -- factories and one step ---------------------------------------------------------------------------------
    def new_state(self, requires_grad: bool = False) -> MPMState:
        return MPMState.zeros(self.particle_count, device=self.device, requires_grad=requires_grad)

    def new_grid(self, requires_grad: bool = False) -> MPMGrid:
        return MPMGrid.zeros(self.model.grid.shape, device=self.device, requires_grad=requires_grad)

    @property
    def plastic(self) -> bool:
        """Whether the model's G2P takes a return-mapping branch per particle (recorded beside the grid's)."""
        from ..kernels import mpm

        return any(m in mpm.PLASTIC_MODELS for m in self.model.models)

    def volume_ratio(self, F: torch.Tensor, Jp: torch.Tensor) -> torch.Tensor:
        """det F of particles with elastic part ``F`` [N, 3, 3] and plastic volume ratio ``Jp`` [N]: det F J_P for
        snow particles (its G2P records the lowest det F that way), det F for the other models' (float32)."""
        det = torch.linalg.det(F.detach().float())
        snowy = self.snow_particles(det.device)
        return torch.where(snowy, det * Jp.detach().float().to(det.device), det) if snowy is not None else det

    def snow_particles(self, device=None) -> torch.Tensor | None:
        """[N] bool: the particles whose model is snow (they read and update J_P), or None where none is."""
        from ..kernels.materials import snow_code

        code = snow_code(self.model.models)
        if code < 0:
            return None
        return (self.model_code == code).to(device if device is not None else self.model_code.device)

    @property
    def decision_bytes_per_step(self) -> int:
        """One byte per grid node, and one per particle for a plastic model."""
        return self.model.grid.node_count + (self.particle_count if self.plastic else 0)

    def new_decisions(self, steps: int, trials: bool = False) -> DecisionBlock:
        """Room for ``steps`` steps of decisions: grid uint8 [steps, nx, ny, nz] and, for a plastic model, particles
        uint8 [steps, N] (row t: a step's); ``trials`` (honoured in a scene with snow): each particle's F_trial too,
        mat33 [steps, N] (FrozenDecisions' linearised replay)."""
        from ..kernels import mpm

        wp = warp()
        grid = wp.zeros((steps, *self.model.grid.shape), dtype=mpm.DECISION_DTYPE, device=self.device)
        particles = (wp.zeros((steps, max(self.particle_count, 1)), dtype=mpm.DECISION_DTYPE, device=self.device)
                     if self.plastic else None)
        kept = (wp.zeros((steps, max(self.particle_count, 1)), dtype=wp.mat33, device=self.device)
                if trials and self.snow_particles() is not None else None)
        return DecisionBlock(grid, particles, kept)

    def step(self, state_in: MPMState, state_out: MPMState, grid: MPMGrid, *, mu, lam, kappa, Fc, control: int,
             clamped=None, J_min=None, taped: bool = True, decision_mode: DecisionMode = DecisionMode.DECIDE,
             decisions=None, tape=None) -> None:
        """One MLS-MPM step from ``state_in`` into ``state_out`` through ``grid`` (which must be zero).

        mu, lam: [N] float arrays, kappa: [N] vec3 array, the material (``launch.p2g``).

        ``taped=False`` (no tape recording) allows the tiled P2G. ``tape``: the tape recording this step, when the
        caller wants P2G's and G2P's split backwards (``launch.p2g``, ``launch.g2p``; taped_segment does).
        ``clamped`` / ``J_min``: where the step counts wall clamps and lowers each particle's lowest det F (default:
        the simulator's own records).
        ``decision_mode`` / ``decisions``: the branch decisions of the grid update and (plastic models) of the
        return mapping, recorded into or replayed from one row of a ``DecisionBlock`` (``StepDecisions``); LINEARISE
        replays them with snow's return mapping linearised at the row's recorded F_trial (RECORD writes it where the
        row has room for it). Only untaped steps linearise.
        """
        trials = decisions.trials if decisions is not None else None
        if decision_mode == DecisionMode.LINEARISE and (trials is None or tape is not None):
            raise SimulationError("a linearised step needs the F_trial record and runs untaped")
        launch.particle_box(self.model, state_in, grid, device=self.device)
        if self.tiled is not None and not taped:
            if self.tiled.sort_due():
                self.tiled.sort(state_in)
            self.tiled.p2g(state_in, grid, mu=mu, lam=lam, kappa=kappa, Fc=Fc, control=control)
        else:
            launch.p2g(self.model, self.particles, state_in, grid, mu=mu, lam=lam, kappa=kappa, Fc=Fc,
                       control=control, tape=tape, affine=self._affine_scratch() if tape is not None else None)
        launch.grid_update(self.model, grid, node_mass_eps=self.node_mass_eps, device=self.device,
                           mode=decision_mode, decisions=decisions.grid if decisions is not None else None)
        particle_mode = decision_mode if self.plastic else DecisionMode.DECIDE
        launch.g2p(self.model, state_in, grid, state_out, mu=mu, lam=lam, kappa=kappa, Fc=Fc, control=control,
                   device=self.device, model_code=self.particles.model_code,
                   clamped=clamped if clamped is not None else self.clamped,
                   J_min=J_min if J_min is not None else self.J_min, mode=particle_mode,
                   decisions=decisions.particles if decisions is not None and self.plastic else None,
                   trials=trials if particle_mode in (DecisionMode.RECORD, DecisionMode.LINEARISE) else None,
                   tape=tape)


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
    decision_bytes: int = 0  # decisions recorded in the forward (1 byte per node, plastic: + 1 per particle, a step)
    recomputed_steps: int = 0  # steps whose decisions the backward re-recorded (beyond the decision budget)
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


def step_with(sim: Simulator, params: dict, state_in: MPMState, state_out: MPMState, grid: MPMGrid, t: int,
              **kw) -> None:
    """Step ``t`` with a rollout's parameter arrays ``params`` (mu, lam, kappa, Fc and whether Fc is a control)."""
    sim.step(state_in, state_out, grid, mu=params["mu"], lam=params["lam"], kappa=params["kappa"], Fc=params["Fc"],
             control=sim.model.control_index(t) if params["controlled"] else -1, **kw)


def taped_segment(sim: Simulator, params: dict, states: list[MPMState], grids: list[MPMGrid], *, start: int,
                  end: int, decisions, seeds, clamped, J_min) -> None:
    """The backward of steps start..end: their replay under a fresh tape from ``states[0]`` (loaded by the caller)
    through ``states[1:]`` and ``grids`` (values and gradients zeroed first), taking the branches in ``decisions``
    (step -> that step's decisions), then the tape's backward from ``seeds`` (the gradient of the end state, one
    array per field). Leaves the gradient of the start state in ``states[0]``'s gradients and adds to those of
    ``params``. The tape is dropped without Tape.reset(), which would also zero the parameters' gradients."""
    wp = warp()
    length = end - start
    for state in states[:length + 1]:
        for array in state.arrays():
            array.grad.zero_()
    for grid in grids[:length]:
        grid.zero_()  # values and gradients
    tape = wp.Tape()
    with tape:
        for t in range(start, end):
            row = t - start
            step_with(sim, params, states[row], states[row + 1], grids[row], t, clamped=clamped, J_min=J_min,
                      decision_mode=DecisionMode.REPLAY, decisions=decisions[t], tape=tape)
    tape.backward(grads=dict(zip(states[length].arrays(), seeds, strict=True)))


def nonfinite_state_error(fields, start: int, end: int) -> SimulationError:
    return SimulationError(f"non-finite particle state ({', '.join(fields)}) after step {end} (segment {start}..{end}); "
                           "lower sim.dt, soften the material or check the controls")


def check_finite(flags, spans) -> None:
    """Raise for the first row of ``flags`` (host ints [rows, 5], launch.nonfinite_fields') with a field set: the
    state after span ``spans[row]`` = (start, end) of the rollout."""
    for row, (start, end) in enumerate(spans):
        bad = [name for name, flag in zip(MPMState.FIELDS, flags[row], strict=True) if flag]
        if bad:
            raise nonfinite_state_error(bad, start, end)


def check_finite_gradients(grads: tuple) -> tuple:
    """``grads`` (tensors or None), unless one holds a NaN or an infinity: one host sync for all of them."""
    present = [g for g in grads if g is not None]
    if present and not bool(torch.stack([torch.isfinite(g).all() for g in present]).all()):
        raise SimulationError("non-finite gradient in the MPM backward pass")
    return grads


class Rollout:
    """A differentiable rollout of ``steps`` steps returning the states at ``frames`` (the last is ``steps``).

    Forward and backward take the same branches: the forward records each step's grid-update decisions (contact,
    friction, separating walls, empty nodes; one byte per node) and, for a plastic model, each particle's
    return-mapping branch (one byte per particle), and the backward's taped replay replays them. The
    record is bounded by ``decision_budget`` bytes: steps beyond it are not kept, and the backward re-records each
    such segment with an untaped replay from its checkpoint before taping it (one more forward pass over those
    steps; on the CPU bit-identical to the first, on CUDA equal up to the order of float atomics). ``frozen``: a
    ``FrozenDecisions`` whose steps this rollout replays, and into which it records the steps it does not hold.
    """

    def __init__(self, sim: Simulator, *, steps: int, frames=(), segment_length: int | None = None,
                 decision_budget: int = DECISION_BUDGET_BYTES, frozen: FrozenDecisions | None = None):
        if any(f < 0 or f > steps for f in frames):
            raise SimulationError(f"frames must lie in 0..{steps}, got {sorted(frames)}")
        self.sim = sim
        self.steps = steps
        self.frames = kept_frames(steps, frames)
        self.segments = segment_bounds(steps, self.frames, segment_length)
        self.stats = RolloutStats(steps=steps, segments=len(self.segments), frames=list(self.frames))
        self.decision_budget = decision_budget
        self.frozen = frozen
        self._checkpoints: list[list[torch.Tensor]] = []
        self._params = None
        self._decisions: dict[int, object] = {}  # step -> uint8 decisions the backward replays

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, x0, v0, F0, C0, Fc, mu, lam, kappa, Jp0) -> list[torch.Tensor]:
        """States at the frames, stacked: x [R, N, 3], v [R, N, 3], F [R, N, 3, 3], C [R, N, 3, 3], Jp [R, N].

        mu, lam: [N] (Pa); kappa: [N, 3], the model's parameter vector (sim/op.py material_kappa)."""
        wp = warp()
        sim = self.sim
        controlled = self._check_controls(Fc)
        fc = Fc if controlled else torch.eye(3, device=sim.torch_device).expand(1, sim.particle_count, 3, 3)
        self._params = dict(Fc=_to_warp(fc, "mat33", controlled), mu=_to_warp(mu, "float32", True),
                            lam=_to_warp(lam, "float32", True), kappa=_to_warp(kappa, "vec3", True),
                            controlled=controlled)
        current, spare = sim.new_state(), sim.new_state()
        _state_from_torch(current, (x0, v0, F0, C0, Jp0))
        grid = sim.new_grid()
        sim.clamped.zero_()
        if sim.particle_count:
            wp.copy(sim.J_min, wp.from_torch(sim.volume_ratio(F0, Jp0).contiguous()))
        outputs = {0: _state_to_torch(current)} if 0 in self.frames else {}
        self._checkpoints = []
        self._decisions = self._plan_decisions()
        flags = wp.zeros((1, len(MPMState.FIELDS)), dtype=int, device=sim.device)
        for start, end in self.segments:
            self._checkpoints.append(_state_to_torch(current))
            for t in range(start, end):
                grid.zero_()
                step_with(sim, self._params, current, spare, grid, t, taped=False, **self._decision_args(t))
                current, spare = spare, current
            flags.zero_()
            launch.nonfinite_fields(current, flags, row=0, count=sim.particle_count, device=sim.device)
            check_finite(flags.numpy(), [(start, end)])
            tensors = _state_to_torch(current)
            if end in self.frames:
                outputs[end] = tensors
        self.stats.clamped_particle_steps = int(sim.clamped.numpy()[0])
        self.stats.det_F_min = wp.to_torch(sim.J_min).clone()[:sim.particle_count]
        self._account_memory()
        return [torch.stack([outputs[f][i] for f in self.frames]) for i in range(len(MPMState.FIELDS))]

    def release(self) -> None:
        """No backward will follow (the outputs need no gradient); nothing to hand back here (``GraphedRollout``)."""

    def _plan_decisions(self) -> dict:
        """step -> (mode, decisions) for the forward: replay what ``frozen`` holds, record (into rows of one block)
        the steps the budget holds, or all of them into ``frozen``; decide the rest (the backward re-records those)."""
        frozen = self.frozen
        per_step = self.sim.decision_bytes_per_step
        plan, fresh = {}, []
        for t in range(self.steps):
            if frozen is not None and t in frozen:
                held = frozen.steps[t]
                plan[t] = (DecisionMode.LINEARISE if held.trials is not None else DecisionMode.REPLAY, held)
            elif frozen is not None or (len(fresh) + 1) * per_step <= self.decision_budget:
                fresh.append(t)
        if fresh:
            block = self.sim.new_decisions(len(fresh), trials=frozen is not None and frozen.linearise)
            for row, t in enumerate(fresh):
                plan[t] = (DecisionMode.RECORD, block[row])
                if frozen is not None:
                    frozen.steps[t] = block[row]
            if block.trials is not None:
                per_step += 36 * self.sim.particle_count
        self.stats.decision_bytes = len(fresh) * per_step
        return plan

    def _decision_args(self, step: int) -> dict:
        mode, array = self._decisions.get(step, (DecisionMode.DECIDE, None))
        return dict(decision_mode=mode, decisions=array)

    def _check_controls(self, Fc) -> bool:
        """Whether there are controls; SimulationError where Fc is not [K, N, 3, 3] for this rollout."""
        sim = self.sim
        K = sim.model.control_layers(self.steps)
        if Fc is not None and tuple(Fc.shape) != (K, sim.particle_count, 3, 3):
            raise SimulationError(f"Fc must have shape [{K}, {sim.particle_count}, 3, 3], got {list(Fc.shape)}")
        return Fc is not None

    def _account_memory(self) -> None:
        n, nodes = self.sim.particle_count, self.sim.model.grid.node_count
        state = state_bytes(n)
        self.stats.bytes_per_step = 2 * (state + grid_bytes(nodes))
        self.stats.peak_taped_bytes = max(e - s for s, e in self.segments) * self.stats.bytes_per_step
        self.stats.checkpoint_bytes = len(self.segments) * state

    # -- backward -----------------------------------------------------------------------------------------------
    def _replay_decisions(self, index: int) -> dict:
        """step -> array of segment ``index``'s decisions, as the forward took them; a segment the forward could
        not keep is re-recorded now by an untaped replay from its checkpoint."""
        start, end = self.segments[index]
        missing = [t for t in range(start, end) if t not in self._decisions]
        if not missing:
            return {t: self._decisions[t][1] for t in range(start, end)}
        sim = self.sim
        wp = warp()
        block = sim.new_decisions(end - start)
        current, spare, grid = sim.new_state(), sim.new_state(), sim.new_grid()
        _state_from_torch(current, self._checkpoints[index])
        counter = wp.zeros(1, dtype=int, device=sim.device)
        J = wp.zeros(max(sim.particle_count, 1), dtype=float, device=sim.device)
        for t in range(start, end):
            grid.zero_()
            args = (dict(decision_mode=DecisionMode.REPLAY, decisions=self._decisions[t][1]) if t in self._decisions
                    else dict(decision_mode=DecisionMode.RECORD, decisions=block[t - start]))
            step_with(sim, self._params, current, spare, grid, t, clamped=counter, J_min=J, taped=True, **args)
            current, spare = spare, current
        self.stats.recomputed_steps += len(missing)
        return {t: self._decisions[t][1] if t in self._decisions else block[t - start] for t in range(start, end)}

    def backward(self, grads) -> tuple:
        """Gradients (x0, v0, F0, C0, Fc or None, mu, lam, kappa, Jp0) from gradients of the stacked frame outputs
        (x, v, F, C, Jp).

        The taped states and grids (one per step of the longest segment) are allocated once and reused by every
        segment, their values and gradients zeroed in between: a segment's tape has run its backward before the
        next one records, so no array a live tape read is overwritten. Fresh arrays per step cost an allocation
        each and, freed in bulk by Python's cycle collector, stalled an iteration for ~0.1 s on an H100 (1M
        particles, 128^3 grid) now and then."""
        wp = warp()
        sim = self.sim
        frame_row = {f: i for i, f in enumerate(self.frames)}
        carry = [torch.zeros_like(c) for c in self._checkpoints[-1]]
        scratch_counter = wp.zeros(1, dtype=int, device=sim.device)
        scratch_J = wp.zeros(max(sim.particle_count, 1), dtype=float, device=sim.device)
        longest = max(end - start for start, end in self.segments)
        states = [sim.new_state(requires_grad=True) for _ in range(longest + 1)]
        grids = [sim.new_grid(requires_grad=True) for _ in range(longest)]
        for index in range(len(self.segments) - 1, -1, -1):
            start, end = self.segments[index]
            if end in frame_row:
                carry = [c + (g[frame_row[end]] if g is not None else 0) for c, g in zip(carry, grads, strict=True)]
            decisions = self._replay_decisions(index)
            _state_from_torch(states[0], self._checkpoints[index])
            seeds = [wp.from_torch(g.float().contiguous(), dtype=getattr(wp, dtype))
                     for g, dtype in zip(carry, STATE_DTYPES, strict=True)]
            taped_segment(sim, self._params, states, grids, start=start, end=end, decisions=decisions, seeds=seeds,
                          clamped=scratch_counter, J_min=scratch_J)
            carry = [wp.to_torch(a.grad).clone() for a in states[0].arrays()]
            del seeds, decisions
        del states, grids
        if 0 in frame_row:
            carry = [c + (g[frame_row[0]] if g is not None else 0) for c, g in zip(carry, grads, strict=True)]
        p = self._params
        g_fc = wp.to_torch(p["Fc"].grad).clone() if p["controlled"] else None
        g_mu, g_lam, g_kappa = (wp.to_torch(p[name].grad).clone() for name in ("mu", "lam", "kappa"))
        self._params, self._checkpoints, self._decisions = None, [], {}  # release Warp arrays (Warp issue #675)
        return check_finite_gradients((*carry[:4], g_fc, g_mu, g_lam, g_kappa, carry[4]))
