"""Rollouts replayed from captured graphs: the steps of ``Rollout`` over arrays kept from one rollout to the next.

A rollout of a given shape (steps, segments, control layers) always issues the same launches; only the values in
its arrays change between optimisation iterations. ``RolloutBuffers`` holds those arrays for one shape (parameters,
the checkpoint of every segment start, the decisions of every step, the backward's taped states and grids, the
gradient carried between segments) and two kinds of ``Program``: the whole forward, and one per segment for the
backward (its taped replay and the tape's adjoints). A program runs eagerly once (which loads its kernels), is
captured into a graph on its second run and replayed from then on: a CUDA graph on a GPU, Warp's API capture on
the CPU. Either way the host packs no kernel arguments per step any more.

When the whole rollout fits on one tape (``rollout_memory``'s full-tape estimate within ``forward_tape_budget``: a
quarter of the GPU's memory, 2 GiB on the CPU) the forward itself is taped into one state and one grid per step and
the backward is that tape's adjoint sweep alone: no checkpoints and no replayed forward, which the checkpointed
backward spends a forward's time on. Longer rollouts keep the checkpoints (one segment taped at a time).

The values a rollout differs by are written into the buffers before a replay and read out after it; nothing a
program reads is reallocated while the buffers live. One rollout at a time holds a set of buffers
(``RolloutBuffers.lease``): a second rollout of the same shape while the first still awaits its backward runs
eagerly (``Rollout``), as do rollouts with a caller's ``FrozenDecisions``, rollouts whose decisions exceed the
decision budget, the tiled P2G and empty bodies.
"""

from __future__ import annotations

import collections
import functools
import weakref

import torch

from ..enums import DecisionMode
from ..warp_runtime import warp
from . import launch
from .grid import rollout_memory
from .model import MPMState
from .solver import FrozenDecisions, Rollout, Simulator, check_finite, check_finite_gradients, step_with, taped_segment

FORWARD_TAPE_SHARE = 0.25  # of a GPU's memory that a rollout's forward may keep on its tape
FORWARD_TAPE_CPU_BYTES = 2 << 30


def forward_tape_budget(sim: Simulator) -> int:
    """Bytes a rollout may keep on one tape over its whole forward (see the module's docstring)."""
    if sim.device.startswith("cuda"):
        return int(FORWARD_TAPE_SHARE * warp().get_device(sim.device).total_memory)
    return FORWARD_TAPE_CPU_BYTES


def tapes_forward(sim: Simulator, *, steps: int, layers: int) -> bool:
    """Whether a rollout of ``steps`` steps keeps its whole forward on one tape (``forward_tape_budget``)."""
    memory = rollout_memory(particle_count=sim.particle_count, node_count=sim.model.grid.node_count, steps=steps,
                            control_layers=layers, segment_length=None)
    return memory.full_tape <= forward_tape_budget(sim)


class Program:
    """A fixed sequence of Warp operations over fixed arrays (``fn``): eager on its first run, captured on its
    second, replayed from the graph after that."""

    def __init__(self, fn, device: str):
        self.fn = fn
        self.device = device
        self.runs = 0
        self.graph = None

    def __call__(self) -> None:
        wp = warp()
        if self.graph is None and self.runs > 0:
            self.graph = _capture(self.fn, self.device)
        if self.graph is not None:
            wp.capture_launch(self.graph)
        else:
            self.fn()
        self.runs += 1


def _capture(fn, device: str):
    """``fn``'s operations as a graph. A CUDA capture runs on a stream of its own (the legacy default stream that
    torch uses cannot capture) that first waits for the current one; replays go to the current stream."""
    wp = warp()
    if device == "cpu":
        with wp.ScopedCapture(device="cpu") as capture:
            fn()
        return capture.graph
    with wp.ScopedStream(_capture_stream(device), sync_enter=True):
        with wp.ScopedCapture(device=device) as capture:
            fn()
    return capture.graph


@functools.cache
def _capture_stream(device: str):
    return warp().Stream(device)


def _views(state: MPMState, grad: bool = False) -> list[torch.Tensor]:
    wp = warp()
    return [wp.to_torch(a.grad if grad else a) for a in state.arrays()]


class RolloutBuffers:
    """The arrays and programs of one rollout shape on one simulator (see the module's docstring)."""

    def __init__(self, sim: Simulator, *, steps: int, segments: list[tuple[int, int]], layers: int,
                 controlled: bool, taped: bool = False):
        wp = warp()
        n, device = sim.particle_count, sim.device
        self.sim, self.segments, self.steps, self.taped = sim, segments, steps, taped
        self.params = dict(Fc=wp.zeros((layers, n), dtype=wp.mat33, device=device, requires_grad=controlled),
                           mu=wp.zeros(n, dtype=float, device=device, requires_grad=True),
                           lam=wp.zeros(n, dtype=float, device=device, requires_grad=True),
                           kappa=wp.zeros(n, dtype=wp.vec3, device=device, requires_grad=True), controlled=controlled)
        self.decisions = sim.new_decisions(steps)
        # the states checked for NaN and infinities (launch.nonfinite_fields, in the forward's graph): the start and
        # each segment's end, one row of flags each; ``spans`` the (start, end) each row reports
        self.spans = [(0, 0), *segments]
        self.flags = wp.zeros((len(self.spans), len(MPMState.FIELDS)), dtype=int, device=device)
        self._owner = None
        if taped:  # every step's state and grid, on the forward's own tape
            self.states = [sim.new_state(requires_grad=True) for _ in range(steps + 1)]
            self.grids = [sim.new_grid(requires_grad=True) for _ in range(steps)]
            self.tape = None  # the forward's, recorded by its latest eager or captured run (the same launches)
            self.views = {t: _views(self.states[t]) for t in {0, *(end for _, end in segments)}}
            self.gradient_views = {t: _views(self.states[t], grad=True) for t in self.views}
            self.forward = Program(self._forward_taped, device)
            self.backward = [Program(self._backward_taped, device)]
            return
        self.checkpoints = [sim.new_state() for _ in range(len(segments) + 1)]  # every segment start, and the end
        self.spares = (sim.new_state(), sim.new_state())
        self.grid = sim.new_grid()
        longest = max(end - start for start, end in segments)
        self.states = [sim.new_state(requires_grad=True) for _ in range(longest + 1)]
        self.grids = [sim.new_grid(requires_grad=True) for _ in range(longest)]
        self.carry = sim.new_state()  # the gradient of a segment's end state, then of its start
        self.counter = wp.zeros(1, dtype=int, device=device)
        self.J_min = wp.zeros(max(n, 1), dtype=float, device=device)
        checkpoint_views = [_views(s) for s in self.checkpoints]
        self.views = {0: checkpoint_views[0], **{end: checkpoint_views[i + 1] for i, (_, end) in enumerate(segments)}}
        self.carry_views = _views(self.carry)
        self.gradient_views = None
        self.forward = Program(self._forward, device)
        self.backward = [Program(functools.partial(self._backward, index), device) for index in range(len(segments))]

    # -- who holds them -----------------------------------------------------------------------------------------
    def lease(self, rollout) -> bool:
        """Hand the buffers to ``rollout`` unless another live rollout still holds them."""
        owner = self._owner() if self._owner is not None else None
        if owner is not None and owner is not rollout:
            return False
        self._owner = weakref.ref(rollout)
        return True

    def release(self, rollout) -> None:
        if self._owner is not None and self._owner() is rollout:
            self._owner = None

    # -- the programs -------------------------------------------------------------------------------------------
    def _forward(self) -> None:
        """Every segment from its checkpoint into the next one (two spare states in between), recording each step's
        decisions; clamps and lowest det F into the simulator's own records."""
        self.flags.zero_()
        self._check(0, self.checkpoints[0])
        for index, (start, end) in enumerate(self.segments):
            source = self.checkpoints[index]
            for t in range(start, end):
                target = self.checkpoints[index + 1] if t == end - 1 else self.spares[(t - start) % 2]
                self.grid.zero_()
                step_with(self.sim, self.params, source, target, self.grid, t, taped=False,
                          decision_mode=DecisionMode.RECORD, decisions=self.decisions[t])
                source = target
            self._check(index + 1, self.checkpoints[index + 1])

    def _check(self, row: int, state: MPMState) -> None:
        launch.nonfinite_fields(state, self.flags, row=row, count=self.sim.particle_count, device=self.sim.device)

    def _forward_taped(self) -> None:
        """Every step from state t into state t + 1 through grid t under one tape, recording each step's decisions
        (which the tape's adjoints then recompute from the same arrays); every gradient zeroed first."""
        wp = warp()
        for state in self.states:
            for array in state.arrays():
                array.grad.zero_()
        for grid in self.grids:
            grid.zero_()  # values and gradients
        tape = wp.Tape()
        with tape:
            for t in range(self.steps):
                step_with(self.sim, self.params, self.states[t], self.states[t + 1], self.grids[t], t,
                          decision_mode=DecisionMode.RECORD, decisions=self.decisions[t], tape=tape)
        self.tape = tape
        self.flags.zero_()
        for row, (_, end) in enumerate(self.spans):
            self._check(row, self.states[end])

    def _backward_taped(self) -> None:
        """The forward tape's adjoints, from the gradients the caller put on the frames' states; the start state's
        gradient is left in states[0]'s."""
        self.tape.backward()

    def _backward(self, index: int) -> None:
        """Segment ``index``: its taped replay from the checkpoint, seeded with ``carry`` at its end; leaves the
        gradient of its start state in ``carry`` and adds to the parameters' gradients."""
        wp = warp()
        start, end = self.segments[index]
        for target, source in zip(self.states[0].arrays(), self.checkpoints[index].arrays(), strict=True):
            wp.copy(target, source)
        taped_segment(self.sim, self.params, self.states, self.grids, start=start, end=end, decisions=self.decisions,
                      seeds=self.carry.arrays(), clamped=self.counter, J_min=self.J_min)
        for target, source in zip(self.carry.arrays(), self.states[0].arrays(), strict=True):
            wp.copy(target, source.grad)


class GraphedRollout(Rollout):
    """``Rollout`` (same arguments, results and gradients) replayed from the programs of ``RolloutBuffers``."""

    def __init__(self, sim: Simulator, buffers: RolloutBuffers, **kw):
        super().__init__(sim, **kw)
        self.buffers = buffers

    def forward(self, x0, v0, F0, C0, Fc, mu, lam, kappa, Jp0) -> list[torch.Tensor]:
        wp = warp()
        sim, b = self.sim, self.buffers
        controlled = self._check_controls(Fc)
        p = b.params
        with torch.no_grad():
            wp.to_torch(p["Fc"]).copy_(Fc.detach() if controlled else torch.eye(3, device=sim.torch_device))
            for name, value in (("mu", mu), ("lam", lam), ("kappa", kappa)):
                wp.to_torch(p[name]).copy_(value.detach())
            for view, value in zip(b.views[0], (x0, v0, F0, C0, Jp0), strict=True):
                view.copy_(value.detach())
            wp.to_torch(sim.J_min)[:sim.particle_count].copy_(sim.volume_ratio(F0, Jp0))
        sim.clamped.zero_()
        b.forward()
        check_finite(b.flags.numpy(), b.spans)
        self.stats.clamped_particle_steps = int(sim.clamped.numpy()[0])
        self.stats.det_F_min = wp.to_torch(sim.J_min).clone()[:sim.particle_count]
        self.stats.decision_bytes = self.steps * sim.decision_bytes_per_step
        self._account_memory()
        if b.taped:
            self.stats.peak_taped_bytes = self.steps * self.stats.bytes_per_step
            self.stats.checkpoint_bytes = 0
        # torch.stack copies: the outputs never alias the buffers the next replay overwrites
        return [torch.stack([b.views[f][i] for f in self.frames]) for i in range(len(MPMState.FIELDS))]

    def backward(self, grads) -> tuple:
        wp = warp()
        b = self.buffers
        p = b.params
        frame_row = {f: i for i, f in enumerate(self.frames)}
        with torch.no_grad():
            for name in ("Fc", "mu", "lam", "kappa"):
                if p[name].grad is not None:
                    p[name].grad.zero_()
            if b.taped:  # the frames' gradients on their states (zeroed by the forward), then one adjoint sweep
                for frame, row in frame_row.items():
                    if frame > 0:
                        self._add_frame_gradient(grads, row, b.gradient_views[frame])
                b.backward[0]()
                carry = [v.clone() for v in b.gradient_views[0]]
                if 0 in frame_row:
                    self._add_frame_gradient(grads, frame_row[0], carry)
            else:
                for view in b.carry_views:
                    view.zero_()
                for index in range(len(self.segments) - 1, -1, -1):
                    end = self.segments[index][1]
                    if end in frame_row:
                        self._add_frame_gradient(grads, frame_row[end], b.carry_views)
                    b.backward[index]()
                if 0 in frame_row:
                    self._add_frame_gradient(grads, frame_row[0], b.carry_views)
                carry = [v.clone() for v in b.carry_views]
            g_fc = wp.to_torch(p["Fc"].grad).clone() if p["controlled"] else None
            g_mu, g_lam, g_kappa = (wp.to_torch(p[name].grad).clone() for name in ("mu", "lam", "kappa"))
        b.release(self)
        return check_finite_gradients((*carry[:4], g_fc, g_mu, g_lam, g_kappa, carry[4]))

    @staticmethod
    def _add_frame_gradient(grads, row: int, views) -> None:
        for view, g in zip(views, grads, strict=True):
            if g is not None:
                view += g[row].to(view.dtype)

    def release(self) -> None:
        """No backward will follow (the outputs need no gradient): the buffers are free for the next rollout."""
        self.buffers.release(self)


class RolloutCache:
    """A simulator's ``RolloutBuffers`` by rollout shape, the most recently used ``size`` of them."""

    def __init__(self, size: int = 2):
        self.size = size
        self._entries: collections.OrderedDict = collections.OrderedDict()

    def get(self, sim: Simulator, *, steps: int, segments, layers: int, controlled: bool,
            taped: bool = False) -> RolloutBuffers:
        key = (steps, tuple(segments), layers, controlled, taped)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        buffers = RolloutBuffers(sim, steps=steps, segments=list(segments), layers=layers, controlled=controlled,
                                 taped=taped)
        self._entries[key] = buffers
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return buffers



def make_rollout(sim: Simulator, *, steps: int, frames, segment_length: int | None, decision_budget: int,
                 frozen: FrozenDecisions | None, controlled: bool) -> Rollout:
    """The rollout ``simulate`` runs: a ``GraphedRollout`` over the simulator's buffers of this shape where it can,
    else an eager ``Rollout`` (see the module's docstring for when)."""
    rollout = Rollout(sim, steps=steps, frames=frames, segment_length=segment_length,
                      decision_budget=decision_budget, frozen=frozen)
    eligible = (sim.graphs and frozen is None and sim.tiled is None and sim.particle_count > 0 and steps > 0
                and steps * sim.decision_bytes_per_step <= decision_budget)
    if not eligible:
        return rollout
    if sim.rollout_cache is None:
        sim.rollout_cache = RolloutCache()
    layers = sim.model.control_layers(steps) if controlled else 1
    buffers = sim.rollout_cache.get(sim, steps=steps, segments=rollout.segments, layers=layers, controlled=controlled,
                                    taped=tapes_forward(sim, steps=steps, layers=layers))
    graphed = GraphedRollout(sim, buffers, steps=steps, frames=frames, segment_length=segment_length,
                             decision_budget=decision_budget)
    return graphed if buffers.lease(graphed) else rollout
