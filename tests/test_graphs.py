"""Graphed rollouts (sim/graphs.py) against eager ones: the same states and gradients over rollouts that run eagerly,
capture and replay, for elastic, plastic and snow models; when a rollout falls back to the eager path."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES
from test_mpm import make_model, make_particles

from diffmpm_cli.sim.graphs import GraphedRollout, make_rollout
from diffmpm_cli.sim.op import simulate
from diffmpm_cli.sim.solver import FrozenDecisions, Rollout, Simulator

N = 60
EXTRA = {"fixed_corotated": {}, "von_mises": {"yield_stress": 750.0}, "snow": {
    "hardening": 10.0, "critical_compression": 0.025, "critical_stretch": 0.0075}}


def rollouts(device: str, *, graphs: bool, material: str = "fixed_corotated", controlled: bool = True,
             frames=(0, 6), repeats: int = 4):
    """``repeats`` rollouts of one simulator with different controls, E and v0; each one's frames, gradients (Fc,
    E, v0) and validity records, on the CPU."""
    model = make_model(control_stride=4, material=material)
    state, mass, volume = make_particles(count=N, seed=6)
    sim = Simulator(model, mass=mass.float().to(device), volume=volume.float().to(device), graphs=graphs)
    results = []
    for r in range(repeats):
        g = torch.Generator().manual_seed(r)
        Fc = ((torch.eye(3) + 0.01 * r * torch.randn(4, N, 3, 3, generator=g)).to(device).requires_grad_(True)
              if controlled else None)
        E = torch.tensor(1.0e4 * (1 + 0.1 * r), device=device, requires_grad=True)
        v0 = state["v"].float().to(device).requires_grad_(True)
        extra = {k: torch.tensor(v, device=device) for k, v in EXTRA[material].items()}
        out = simulate(sim, x0=state["x"].float().to(device), v0=v0, F0=state["F"].float().to(device), E=E,
                       nu=torch.tensor(0.3, device=device), Fc=Fc, steps=16, frames=frames, **extra)
        loss = out.x.sum() + (out.F**2).sum() + out.v[0].sum() + out.Jp.sum()
        loss.backward()
        results.append(dict(x=out.x, F=out.F, Jp=out.Jp, dFc=Fc.grad if controlled else torch.zeros(()),
                            dE=E.grad, dv0=v0.grad, det_F_min=out.stats.det_F_min,
                            clamped=torch.tensor(out.stats.clamped_particle_steps)))
    return [{k: v.detach().cpu() for k, v in r.items()} for r in results], sim


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("material,controlled", [("fixed_corotated", True), ("von_mises", False), ("snow", True)])
@pytest.mark.parametrize("taped", [False, True], ids=["checkpointed", "taped-forward"])
def test_graphed_rollouts_equal_eager_ones(device, material, controlled, taped, monkeypatch):
    """Rollout 1 runs the programs eagerly, 2 captures them, 3 and 4 replay: every one equals an eager rollout (on
    the CPU to the bit; on CUDA up to the order of float atomics, which two eager rollouts differ by as much: on the
    H100 the snow's dFc by 2e-4 of its largest entry (its clamp's adjoint divides by singular-value gaps down to
    1e-6), up to 1.7e-3 graphed against eager; the elastic and von Mises ones by < 1e-6, except von Mises' dE: 1-2e-5
    of the largest one's across the repeats on an H200, old and new transfer adjoints alike, and up to 1.4e-4 of a
    repeat whose dE nearly cancels (3.3e-6 against 8.4e-5), which is why each quantity is measured against its largest
    value over the repeats).

    ``taped``: the graphed rollout keeps its whole forward on one tape (sim/graphs.py forward_tape_budget), else it
    checkpoints as the eager one does. The forward is the same either way (bit for bit on the CPU); one tape sums each
    frame's gradient into its state before the adjoints instead of after, so on the CPU the gradients differ from
    the eager ones in the last bits (<= 1e-6 of the largest)."""
    from diffmpm_cli.sim import graphs

    monkeypatch.setattr(graphs, "FORWARD_TAPE_CPU_BYTES", graphs.FORWARD_TAPE_CPU_BYTES if taped else 0)
    monkeypatch.setattr(graphs, "FORWARD_TAPE_SHARE", graphs.FORWARD_TAPE_SHARE if taped else 0.0)
    eager, _ = rollouts(device, graphs=False, material=material, controlled=controlled)
    graphed, sim = rollouts(device, graphs=True, material=material, controlled=controlled)
    (buffers,) = sim.rollout_cache._entries.values()
    assert buffers.taped == taped
    assert buffers.forward.graph is not None and all(p.graph is not None for p in buffers.backward)
    assert buffers.forward.runs == 4
    cuda_tol = 1e-2 if material == "snow" else 1e-4
    scales = {key: max(max(float(r[key].abs().max()) for r in eager), 1e-12) for key in eager[0]}
    for a, b in zip(eager, graphed, strict=True):
        assert a.keys() == b.keys()
        for key, scale in scales.items():
            tol = cuda_tol if device != "cpu" else (1e-6 if taped and key.startswith("d") and key != "det_F_min" else 0.0)
            assert float((a[key] - b[key]).abs().max()) <= tol * scale, key
    assert not torch.equal(graphed[0]["dFc" if controlled else "dE"], graphed[-1]["dFc" if controlled else "dE"])


def test_a_second_rollout_while_the_first_awaits_its_backward_runs_eagerly():
    model = make_model(control_stride=4)
    state, mass, volume = make_particles(count=N, seed=6)
    sim = Simulator(model, mass=mass.float(), volume=volume.float())
    kw = dict(steps=16, frames=(), segment_length=None, decision_budget=1 << 30, frozen=None, controlled=False)
    first = make_rollout(sim, **kw)
    second = make_rollout(sim, **kw)
    assert isinstance(first, GraphedRollout) and type(second) is Rollout
    first.release()
    assert isinstance(make_rollout(sim, **kw), GraphedRollout)

    def gradient(requires_grad=True):
        E = torch.tensor(1.0e4, requires_grad=requires_grad)
        out = simulate(sim, x0=state["x"].float(), v0=state["v"].float(), E=E, nu=torch.tensor(0.3), steps=16)
        return out, E

    (a, Ea), (b, Eb) = gradient(), gradient()  # a holds the buffers until its backward: b runs eagerly
    b.x.sum().backward()
    a.x.sum().backward()
    assert torch.equal(Ea.grad, Eb.grad)
    with torch.no_grad():
        gradient(requires_grad=False)  # a rollout without a backward hands the buffers straight back
    (buffers,) = sim.rollout_cache._entries.values()
    assert buffers.lease(object.__new__(Rollout))


def test_frozen_decisions_over_budget_decisions_and_the_tiled_p2g_run_eagerly():
    model = make_model(control_stride=4)
    _, mass, volume = make_particles(count=N, seed=6)
    sim = Simulator(model, mass=mass.float(), volume=volume.float())
    kw = dict(steps=16, frames=(), segment_length=None, controlled=False)
    assert type(make_rollout(sim, **kw, decision_budget=1 << 30, frozen=FrozenDecisions())) is Rollout
    assert type(make_rollout(sim, **kw, decision_budget=sim.decision_bytes_per_step * 15, frozen=None)) is Rollout
    eager = Simulator(model, mass=mass.float(), volume=volume.float(), graphs=False)
    assert type(make_rollout(eager, **kw, decision_budget=1 << 30, frozen=None)) is Rollout


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("taped", [False, True], ids=["checkpointed", "taped-forward"])
def test_a_non_finite_state_is_reported_as_the_eager_rollout_reports_it(device, taped, monkeypatch):
    """The graphed forward flags NaN and infinities in its graph (launch.nonfinite_fields at the start and every
    segment's end) and raises the eager rollout's error: same fields, same step, same segment. A particle's inverted
    F makes neo-Hookean's log J NaN in the first step; the rollouts before it (eager run, capture) were finite, so the
    error comes from a replayed graph, and the finite rollout after it must not inherit its flags."""
    from diffmpm_cli.errors import SimulationError
    from diffmpm_cli.sim import graphs

    monkeypatch.setattr(graphs, "FORWARD_TAPE_CPU_BYTES", graphs.FORWARD_TAPE_CPU_BYTES if taped else 0)
    monkeypatch.setattr(graphs, "FORWARD_TAPE_SHARE", graphs.FORWARD_TAPE_SHARE if taped else 0.0)
    model = make_model(control_stride=4, material="neo_hookean")
    state, mass, volume = make_particles(count=N, seed=6)
    F_bad = state["F"].float().clone()
    F_bad[3] = torch.diag(torch.tensor([1.0, 1.0, -1.0]))

    def run(sim, F0):
        v0 = state["v"].float().to(device).requires_grad_(True)
        out = simulate(sim, x0=state["x"].float().to(device), v0=v0, F0=F0.to(device),
                       E=torch.tensor(1.0e4, device=device), nu=torch.tensor(0.3, device=device), steps=16,
                       segment_length=4)
        out.x.sum().backward()

    messages = []
    for graphs_on in (False, True):
        sim = Simulator(model, mass=mass.float().to(device), volume=volume.float().to(device), graphs=graphs_on)
        if graphs_on:
            for _ in range(2):  # the eager run, then the capture: finite
                run(sim, state["F"].float())
        expected = r"non-finite particle state \(.*F.*\) after step 4 \(segment 0\.\.4\)"
        with pytest.raises(SimulationError, match=expected) as err:
            run(sim, F_bad)
        messages.append(str(err.value))
        del err
        run(sim, state["F"].float())  # finite again: the flags of the failed rollout are not kept
    (buffers,) = sim.rollout_cache._entries.values()
    assert buffers.taped == taped and buffers.forward.graph is not None
    assert buffers.forward.runs == 4  # both after the capture replayed the graph
    assert messages[0] == messages[1]
