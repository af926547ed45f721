"""check-grad's linearised replay of snow's clamp: the base rollout records each particle's F_trial*, and the probes'
forwards take G(F*) + dG(F*)[F_trial - F*] (and J_P's update likewise) instead of the clamp, whose derivative changes
by O(1) between straddling singular values a few 1e-4 apart (docs/MATERIALS.md). The kernel's linearised map against
the float64 twin's forward-mode JVP (torch.func.jvp through torch's SVD), the base rollout unchanged to the bit, only
snow particles linearised in a mixed scene, and central differences of linearised probe rollouts through an impact
against autodiff (and what the plain replay gives there)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import warp as wp
from conftest import REPO
from diffmpm_cli.kernels import mpm
from diffmpm_cli.kernels.viscoplastic import snow_branch, snow_clamp_jvp, snow_F
from test_mpm import make_model, make_particles

from diffmpm_cli.reference.mpm import snow_linearised_ref, snow_ref, snow_volume_factor_ref
from diffmpm_cli.sim.op import simulate
from diffmpm_cli.sim.solver import FrozenDecisions, Simulator

THETA_C, THETA_S = 0.025, 0.0075  # the snow preset's
JP = 0.9  # the incoming J_P of the kernel test


@wp.kernel(module="unique")
def _linearised_map(F_star: wp.array(dtype=wp.mat33), F_trial: wp.array(dtype=wp.mat33), k: wp.array(dtype=wp.vec3),
                    F_lin: wp.array(dtype=wp.mat33), Jp_lin: wp.array(dtype=float), F_true: wp.array(dtype=wp.mat33),
                    Jp_true: wp.array(dtype=float), dG: wp.array(dtype=wp.mat33d), dh: wp.array(dtype=wp.float64),
                    branch: wp.array(dtype=int)):
    """G2P's linearised snow arm at F_trial, the true map (G2P's other arm) at F_trial, and the JVP along F_trial - F*."""
    i = wp.tid()
    b = snow_branch(F_star[i], 1.0, 1.0, k[i])
    F, Jp = mpm.snow_linearised(F_trial[i], F_star[i], 1.0, 1.0, k[i], 5e-4, b, JP)
    F_lin[i] = F
    Jp_lin[i] = Jp
    G = snow_F(F_trial[i], 1.0, 1.0, k[i], 5e-4, b)
    F_true[i] = G
    Jp_true[i] = JP * wp.determinant(F_trial[i]) / wp.determinant(G)
    d, e = snow_clamp_jvp(F_star[i], wp.mat33d(F_trial[i]) - wp.mat33d(F_star[i]), k[i], b)
    dG[i] = d
    dh[i] = e
    branch[i] = b


def _run_map(F_star: torch.Tensor, F_trial: torch.Tensor) -> dict:
    n = F_star.shape[0]
    k = torch.tensor([10.0, THETA_C, THETA_S]).expand(n, 3).contiguous()
    out = dict(F_lin=wp.zeros(n, dtype=wp.mat33), Jp_lin=wp.zeros(n, dtype=float), F_true=wp.zeros(n, dtype=wp.mat33),
               Jp_true=wp.zeros(n, dtype=float), dG=wp.zeros(n, dtype=wp.mat33d), dh=wp.zeros(n, dtype=wp.float64),
               branch=wp.zeros(n, dtype=int))
    wp.launch(_linearised_map, dim=n, inputs=[wp.from_torch(F_star.float().contiguous(), dtype=wp.mat33),
                                              wp.from_torch(F_trial.float().contiguous(), dtype=wp.mat33),
                                              wp.from_torch(k, dtype=wp.vec3)], outputs=list(out.values()))
    return {name: wp.to_torch(a).clone() for name, a in out.items()}


def _twin_kappa(n: int) -> torch.Tensor:
    """The twin's (xi, theta_c, theta_s) whose bounds 1 - theta_c, 1 + theta_s are the kernel's float32 ones: a
    divided difference across a gap of 2e-5 sees the bounds' float32 rounding (6e-8) at 3e-3."""
    k32 = torch.tensor([THETA_C, THETA_S], dtype=torch.float32)
    low, high = (1 - k32[0]).double(), (1 + k32[1]).double()
    return torch.tensor([10.0, 1 - float(low), float(high) - 1], dtype=torch.float64).expand(n, 3)


def _rotation(g) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]


HIGH, LOW = 1 + THETA_S, 1 - THETA_C
# singular values of F*: straddling a bound (one beyond, one inside; gaps 8e-4 .. 2e-6), both beyond one bound, one
# beyond each, all three clamped, none near a bound
ROTATED = [(HIGH + 2e-4, HIGH - 6e-4, 0.99), (HIGH + 1e-4, HIGH - 1e-4, 1.0), (HIGH + 1e-5, HIGH - 1e-5, 0.98),
           (HIGH + 1e-6, HIGH - 1e-6, 1.0), (1.0, LOW + 3e-4, LOW - 5e-4), (1.0, LOW + 1e-6, LOW - 1e-6),
           (HIGH + 4e-4, 1.0, LOW - 1e-4), (HIGH + 3e-3, HIGH + 1e-3, 0.99), (1.02, 0.99, 0.95),
           (1.01, LOW - 1e-3, LOW - 2e-3), (1.2, 1.1, 0.9)]
# exactly repeated singular values (diagonal F*, no rotation): two inside, two beyond one bound, three beyond
REPEATED = [(1.0, 1.0, 0.97), (1.01, 1.01, 1.0), (0.97, 0.97, 0.97), (1.02, 0.99, 0.99)]


def test_the_linearised_clamp_is_the_map_at_its_record_and_its_derivative_is_the_twins():
    """At F_trial = F* the linearised arm returns the true map's F_E and J_P bit for bit (the base rollout and the
    autodiff probe are unchanged). Its JVP (float64, the SVD's own derivative) equals the float64 twin's forward-mode
    JVP to 1e-9 where singular values straddle a bound down to a gap of 2e-6 (the divided differences there run from
    0 to 1), sit beyond one or both bounds or none; at exactly repeated values (where torch's SVD JVP divides by 0)
    it equals the twin's central differences. The linearised output is the twin's linearised map to float32."""
    g = torch.Generator().manual_seed(0)
    rotated = torch.stack([_rotation(g) @ torch.diag(torch.tensor(d, dtype=torch.float64)) @ _rotation(g)
                           for d in ROTATED])
    repeated = torch.stack([torch.diag(torch.tensor(d, dtype=torch.float64)) for d in REPEATED])
    F_star = torch.cat([rotated, repeated]).float().double()  # what the kernel records
    n, m = F_star.shape[0], len(ROTATED)
    D = 1e-3 * torch.randn(n, 3, 3, generator=g, dtype=torch.float64)
    F_trial = (F_star + D).float().double()
    D = F_trial - F_star
    k = _twin_kappa(n)
    # the records are read as the forward would: every case clamps at least one singular value
    at_record = _run_map(F_star, F_star)
    assert bool((at_record["branch"] != 0).all())
    assert torch.equal(at_record["F_lin"], at_record["F_true"]) and torch.equal(at_record["Jp_lin"], at_record["Jp_true"])
    out = _run_map(F_star, F_trial)

    _, (dG_ref, dh_ref) = torch.func.jvp(lambda X: (snow_ref(X, k[:m]), snow_volume_factor_ref(X, k[:m])),
                                         (F_star[:m],), (D[:m],))
    dG_err = (out["dG"][:m] - dG_ref).flatten(1).norm(dim=1) / dG_ref.flatten(1).norm(dim=1)
    assert float(dG_err.max()) < 1e-9, dG_err
    assert float(((out["dh"][:m] - dh_ref).abs() / dh_ref.abs()).max()) < 1e-9

    h = 1e-6  # the twin's central differences at the repeated values (smooth there: each pair shares a branch)
    for i in range(m, n):
        Fi, Di, ki = F_star[i:i + 1], D[i:i + 1], k[i:i + 1]
        fd_G = (snow_ref(Fi + h * Di / Di.norm(), ki) - snow_ref(Fi - h * Di / Di.norm(), ki)) / (2 * h) * Di.norm()
        fd_h = (snow_volume_factor_ref(Fi + h * Di / Di.norm(), ki)
                - snow_volume_factor_ref(Fi - h * Di / Di.norm(), ki)) / (2 * h) * Di.norm()
        assert float((out["dG"][i] - fd_G[0]).norm() / fd_G.norm()) < 1e-7, REPEATED[i - m]
        assert abs(float(out["dh"][i] - fd_h[0])) < 1e-7 * abs(float(fd_h[0])), REPEATED[i - m]

    F_ref, h_ref = snow_linearised_ref(F_trial[:m], F_star[:m], k[:m])  # G(F*) by float32 svd3: 5e-7 measured
    assert float((out["F_lin"][:m].double() - F_ref).abs().max()) < 2e-6
    assert float((out["Jp_lin"][:m].double() - JP * h_ref).abs().max()) < 2e-6
    # where singular values straddle a bound the true map's step is not its linearisation's (a chord): 1e-3 moves
    # the output of the 2e-6 gap's F* by 1.5e-4 more than dG says
    assert float((snow_ref(F_trial[3:4], k[3:4]) - F_ref[3:4]).abs().max()) > 1e-4


def _impact(steps: int):
    """The snowball of tests/test_snow.py's twin comparison (136 particles, grid 16) thrown at 6 m/s onto the floor,
    ``steps`` steps; (pipeline, starting controls, loss weights, four unit directions)."""
    from diffmpm_cli.assets import build_assets
    from diffmpm_cli.config import load_scene
    from diffmpm_cli.pipeline import Pipeline

    scene = load_scene(REPO / "scenes" / "snowball_impact.yaml",
                       ["sim.grid_resolution=16", f"sim.steps={steps}", f"sim.control_stride={steps}",
                        f"sim.frames=[{steps}]", "source.center=[0.5,0.36,0.5]", "sim.floor.height=0.1875",
                        "sim.initial_velocity=[0.0,-6.0,0.0]"])
    pipe = Pipeline(scene, build_assets(scene))
    n = int(pipe.x0.shape[0])
    g = torch.Generator().manual_seed(0)
    dFc0 = 0.002 * torch.randn(1, n, 3, 3, generator=g, dtype=torch.float64)
    weights = {k: torch.randn(n, *((3,) if k in "xv" else (3, 3)), generator=g, dtype=torch.float64) for k in "xvFC"}
    directions = [u / u.norm() for u in (torch.randn(dFc0.shape, generator=g, dtype=torch.float64) for _ in range(4))]
    return pipe, dFc0, weights, directions


def test_central_differences_of_linearised_probes_through_an_impact_match_autodiff():
    """24 steps of the snowball hitting the floor (snow's clamp acts on 29 % of the particle-steps):
    central differences of the control at 4e-3 per entry along four random directions. Probes that linearise the
    clamp at the base's F_trial agree with autodiff to 1.4e-3 (measured 4e-5..1.4e-3; 1e-3..4e-3 per entry alike);
    the plain frozen replay, whose probes take the true clamp, is 4-13 % off at this step (1-3 % at 2e-3, where
    float32 rounding reaches 1e-3). The base rollout is the unfrozen one to the bit, with either record."""
    steps = 24
    pipe, dFc0, weights, directions = _impact(steps)
    with torch.no_grad():
        plain = pipe.simulate({"dFc": dFc0.float()})
    errors = {}
    for linearise in (True, False):
        frozen = FrozenDecisions(linearise=linearise)

        def loss(d, frozen=frozen):
            r = pipe.simulate({"dFc": d}, frozen=frozen)
            return sum((getattr(r, k)[-1].double() * weights[k]).sum() for k in "xvFC")

        with torch.no_grad():
            base = pipe.simulate({"dFc": dFc0.float()}, frozen=frozen)
        assert all(torch.equal(getattr(base, k), getattr(plain, k)) for k in ("x", "v", "F", "C", "Jp"))
        assert (frozen.steps[steps - 1].trials is not None) == linearise
        clamped = np.stack([frozen.steps[t].particles.numpy() for t in range(steps)]) != 0
        assert 0.2 < clamped.mean() < 0.4  # 29 % of the particle-steps clamp
        leaf = dFc0.float().requires_grad_(True)
        (v,) = torch.autograd.grad(loss(leaf), leaf)
        errors[linearise] = []
        for u in directions:
            ad = float((v.double() * u).sum())
            h = 4e-3 * u.numel() ** 0.5
            with torch.no_grad():
                fd = (float(loss((dFc0 + h * u).float())) - float(loss((dFc0 - h * u).float()))) / (2 * h)
            errors[linearise].append(abs(fd - ad) / abs(ad))
    assert max(errors[True]) < 5e-3, errors
    assert min(errors[False]) > 2e-2, errors


def test_only_snow_particles_linearise_in_a_mixed_scene():
    """snow + drucker_prager particles side by side, their branches frozen with F_trial recorded: the base rollout is
    the unfrozen one to the bit; a perturbed probe replays with sand's record filled with NaN and stays finite (sand
    never reads it) while snow's is read (a NaN there stops the rollout); it differs from the plain replay's probe
    (snow linearised). A scene without snow records no F_trial, and its probes are the plain replay's to the bit."""
    from diffmpm_cli.errors import SimulationError

    state, mass, volume = make_particles(count=80, seed=4)
    codes = torch.arange(80) % 2

    def run(sim, material, frozen=None, v_shift=0.0):
        with torch.no_grad():
            return simulate(sim, x0=state["x"].float(), v0=state["v"].float() + v_shift, F0=state["F"].float(),
                            C0=state["C"].float(), E=torch.tensor(1.0e4), nu=torch.tensor(0.3), steps=12,
                            frozen=frozen, **{k: torch.tensor(v) for k, v in material.items()})

    models = ("snow", "drucker_prager")
    sim = Simulator(make_model(material=models[0], models=models, dt=2e-3), mass=mass.float(), volume=volume.float(),
                    model_code=codes)
    material = dict(hardening=10.0, critical_compression=0.08, critical_stretch=0.06, friction_angle=30.0)
    plain = run(sim, material)
    linearised, replayed = FrozenDecisions(), FrozenDecisions(linearise=False)
    for frozen in (linearised, replayed):
        base = run(sim, material, frozen)
        assert all(torch.equal(getattr(base, k), getattr(plain, k)) for k in ("x", "v", "F", "C", "Jp"))
    branches = np.stack([linearised.steps[t].particles.numpy() for t in range(12)])
    assert (branches[:, codes == 0] != 0).any() and (branches[:, codes == 1] != 0).any()  # both models map
    records = [wp.to_torch(linearised.steps[t].trials) for t in range(12)]
    for record in records:
        record[codes == 1] = math.nan
    probe = run(sim, material, linearised, v_shift=0.02)
    assert all(bool(torch.isfinite(getattr(probe, k)).all()) for k in ("x", "v", "F", "C", "Jp"))
    assert not torch.equal(probe.F, run(sim, material, replayed, v_shift=0.02).F)
    for record in records:
        record[codes == 0] = math.nan
    with pytest.raises(SimulationError, match="non-finite particle state"):
        run(sim, material, linearised, v_shift=0.02)

    models = ("neo_hookean", "von_mises")
    other = Simulator(make_model(material=models[0], models=models, dt=2e-3), mass=mass.float(),
                      volume=volume.float(), model_code=codes)
    material = dict(yield_stress=750.0)
    linearised, replayed = FrozenDecisions(), FrozenDecisions(linearise=False)
    for frozen in (linearised, replayed):
        run(other, material, frozen)
    assert all(linearised.steps[t].trials is None for t in range(12))
    probes = [run(other, material, frozen, v_shift=0.02) for frozen in (linearised, replayed)]
    assert all(torch.equal(getattr(probes[0], k), getattr(probes[1], k)) for k in ("x", "v", "F", "C", "Jp"))


def test_a_linearised_step_needs_the_record_and_no_tape():
    """LINEARISE runs only untaped, and only with the F_trial record (sim/solver.py Simulator.step); a simulator
    without snow keeps no record."""
    from diffmpm_cli.enums import DecisionMode
    from diffmpm_cli.errors import SimulationError

    _, mass, volume = make_particles(count=8, seed=1)
    sim = Simulator(make_model(material="snow", dt=2e-3), mass=mass.float(), volume=volume.float())
    assert sim.new_decisions(1).trials is None and sim.new_decisions(2, trials=True).trials.shape == (2, 8)
    elastic = Simulator(make_model(material="von_mises", dt=2e-3), mass=mass.float(), volume=volume.float())
    assert elastic.new_decisions(1, trials=True).trials is None
    params = dict(mu=wp.zeros(8, dtype=float), lam=wp.zeros(8, dtype=float), kappa=wp.zeros(8, dtype=wp.vec3),
                  Fc=wp.zeros((1, 8), dtype=wp.mat33), control=-1)
    with pytest.raises(SimulationError, match="F_trial record"):
        sim.step(sim.new_state(), sim.new_state(), sim.new_grid(), **params, taped=False,
                 decision_mode=DecisionMode.LINEARISE, decisions=sim.new_decisions(1)[0])
    with pytest.raises(SimulationError, match="untaped"):
        sim.step(sim.new_state(), sim.new_state(), sim.new_grid(), **params, decision_mode=DecisionMode.LINEARISE,
                 decisions=sim.new_decisions(1, trials=True)[0], tape=wp.Tape())
