"""Snow (Stomakhin 2013) beyond the shared material tests: the clamp's adjoint where an inside and a clamped singular
value nearly meet, check-grad's probe base for snow's controls, the stability check at compacted snow and the
validity metrics of snow's total volume ratio det F_E J_P."""

from __future__ import annotations

import math

import pytest
import torch
from test_materials import mapping_vjp
from test_mpm import GRID, make_model, make_particles

from diffmpm_cli.reference.mpm import snow_ref
from diffmpm_cli.sim.solver import FrozenDecisions

THETA_C, THETA_S = 0.025, 0.0075  # the snow preset's


def rotation(axis: int, angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    R = torch.eye(3, dtype=torch.float64)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


def test_clamp_adjoint_where_an_inside_and_a_clamped_singular_value_nearly_meet():
    """F_trial with one singular value just beyond a bound and one just inside, 2e-4..8e-4 apart (what the step after
    a clamp leaves: the clamp puts singular values on the bound, dt C splits them): the adjoint equals central
    differences of the float64 twin. Its divided difference (g_i - g_j) / (s_i - s_j) is d1 / (d0 + d1) there, not
    the 1/2 that spectral_adjoint's repeated-value limit gave below a gap of 2e-3 (AD 0.72 vs 0.80, -0.98 vs -1.01)."""
    import warp as wp
    from diffmpm_cli.kernels import mpm

    _, func, branch_of = mpm.KERNEL_MODELS["snow"]

    @wp.kernel(module="unique")
    def project(F: wp.array(dtype=wp.mat33), kappa: wp.array(dtype=wp.vec3), out: wp.array(dtype=wp.mat33)):
        i = wp.tid()
        out[i] = func(F[i], 1.0, 1.0, kappa[i], 5e-4, branch_of(F[i], 1.0, 1.0, kappa[i]))

    high, low = 1 + THETA_S, 1 - THETA_C
    diagonals = [(high + 2e-4, high - 6e-4, 0.99), (high + 6e-4, high - 2e-4, 0.99), (high + 1e-4, high - 1e-4, 1.0),
                 (1.0, low + 3e-4, low - 5e-4), (high + 4e-4, 1.0, low - 1e-4)]
    g = torch.Generator().manual_seed(0)
    # U, V turned about two axes each: wp.svd3 resolves their singular vectors to ~1e-4 there (for some random
    # rotations its float32 Jacobi sweeps leave a near-repeated pair's vectors 1e-2 off, which no adjoint can undo)
    left, right = rotation(2, 0.6) @ rotation(0, 0.3), rotation(1, -0.4) @ rotation(2, 0.2)
    Fs = torch.stack([left @ torch.diag(torch.tensor(d, dtype=torch.float64)) @ right for d in diagonals])
    Fs = Fs.float().double()  # the twin at the very matrices the kernel sees
    count = len(diagonals)
    k = torch.tensor([10.0, THETA_C, THETA_S], dtype=torch.float64)
    cot = torch.randn(count, 3, 3, generator=g, dtype=torch.float64)
    grad_F, grad_k = mapping_vjp(project, Fs, k, cot)

    def ref(F_, k_):
        return snow_ref(F_[None], k_[None])[0]

    h = 1e-7  # far below the gaps: the twin's central difference is its derivative
    for i in range(count):
        for _ in range(4):
            u = torch.randn(3, 3, generator=g, dtype=torch.float64)
            u /= u.norm()
            fd = float(((ref(Fs[i] + h * u, k) - ref(Fs[i] - h * u, k)) / (2 * h) * cot[i]).sum())
            ad = float((grad_F[i] * u).sum())
            assert abs(ad - fd) <= 2e-3 * max(1.0, abs(fd)), (diagonals[i], ad, fd)
        for j in (1, 2):  # theta_c, theta_s
            e = torch.zeros(3, dtype=torch.float64)
            e[j] = 1e-7
            fd = float(((ref(Fs[i], k + e) - ref(Fs[i], k - e)) / 2e-7 * cot[i]).sum())
            assert abs(float(grad_k[i, j]) - fd) <= 2e-3 * max(1.0, abs(fd)), (diagonals[i], j, float(grad_k[i, j]), fd)


def test_a_central_difference_across_the_gap_measures_a_chord():
    """Why check-grad's controls must not start snow on its clamp: at s = (1.0077, 1.0069) (one beyond 1 + theta_s,
    one inside) the clamp's derivative along a shear is 3/4 (the divided difference), and central differences of the
    float64 twin itself (no freezing, no float32) give 0.62 over a step of 1e-3 and 0.51 over 1e-2: they approach it
    only below the gap."""
    F = torch.diag(torch.tensor([1 + THETA_S + 2e-4, 1 + THETA_S - 6e-4, 0.99], dtype=torch.float64))
    k = torch.tensor([[10.0, THETA_C, THETA_S]], dtype=torch.float64)
    u = torch.zeros(3, 3, dtype=torch.float64)
    u[0, 1] = u[1, 0] = 2**-0.5

    def central(h):
        return float(((snow_ref((F + h * u)[None], k) - snow_ref((F - h * u)[None], k))[0] * u).sum() / (2 * h))

    assert central(1e-7) == pytest.approx(0.75, abs=1e-6)
    assert central(1e-3) < 0.65 and central(1e-2) < 0.55
    assert math.isclose(central(1e-5), 0.75, rel_tol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# physical validity reads the whole deformation gradient's det F = det F_E J_P


def test_deformation_validity_multiplies_the_plastic_volume_ratio():
    from diffmpm_cli.metrics import deformation_validity

    F = torch.diag(torch.tensor([1.0, 1.0, 0.98])).expand(4, 3, 3)  # clamped F_E: det 0.98 whatever happened
    Jp = torch.tensor([1.0, 0.5, 0.2, -0.3])
    plain, whole = deformation_validity(F), deformation_validity(F, Jp)
    assert plain["inverted_share"] == 0 and plain["det_F_min"] == pytest.approx(0.98)
    assert whole["inverted_share"] == 0.25 and whole["det_F_min"] == pytest.approx(-0.294)
    assert whole["det_F_median"] == pytest.approx(0.98 * 0.35)
    with pytest.raises(ValueError, match="one value per"):
        deformation_validity(F, Jp[:3])


@pytest.mark.parametrize("material", ["snow", "fixed_corotated"])
def test_an_inverting_flow_is_reported_for_snow_as_for_an_elastic_body(material):
    """A velocity field v = -k (x - c) with k dt = 2 turns every particle inside out in one step (F+ = -F). An elastic
    body's det F says so; snow's clamp lifts the negative singular value of F_E to 1 - theta_c (det F_E = 0.975 > 0)
    and the sign goes to J_P: validity must read det F_E J_P (it read det F_E: 'valid', inverted 0 %)."""
    from types import SimpleNamespace

    from diffmpm_cli.optimize.evaluate import validity_metrics
    from diffmpm_cli.sim.op import simulate
    from diffmpm_cli.sim.solver import Simulator

    dt, k = 2e-3, 1000.0
    model = make_model(material=material, dt=dt, gravity=(0.0, 0.0, 0.0))
    axis = torch.linspace(0.42, 0.58, 3)
    x = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    n = x.shape[0]
    c = torch.full((3,), 0.5)
    volume = torch.full((n,), (GRID.dx / 2) ** 3)
    sim = Simulator(model, mass=400.0 * volume, volume=volume)
    snow = ({"hardening": torch.tensor(10.0), "critical_compression": torch.tensor(THETA_C),
             "critical_stretch": torch.tensor(THETA_S)} if material == "snow" else {})
    result = simulate(sim, x0=x, v0=-k * (x - c), C0=-k * torch.eye(3).expand(n, 3, 3).contiguous(),
                      E=torch.tensor(1.0e3), nu=torch.tensor(0.2), steps=1, **snow)
    det_F = torch.linalg.det(result.F[-1].double())
    if material == "snow":  # the clamp hid the inversion in F_E
        assert bool((det_F > 0).all()) and bool((result.Jp[-1] < 0).all())
    else:
        assert bool((det_F < 0).all())
    pipeline = SimpleNamespace(assets=SimpleNamespace(grid=GRID), model=model,
                               scene=SimpleNamespace(sim=SimpleNamespace(particles_per_cell=2)))
    validity = validity_metrics(pipeline, result)
    assert validity["inverted_share"] == 1.0 and validity["det_F_min"] < 0
    assert validity["inverted_share_any_step"] == 1.0 and validity["det_F_min_any_step"] < 0
    assert not validity["physically_valid"]


# ----------------------------------------------------------------------------------------------------------------
# the stability check at compacted snow


def test_the_stability_check_holds_snow_at_its_starting_compaction():
    """A dt stable for fresh snow (J_P0 = 1, CFL 0.12) is refused for snow compacted to J_P0 = 0.5 at xi 10 (stiffer
    by exp(5) = 148: CFL 1.46), with one line naming sim.dt, the hardening and a stable dt; the same compaction at
    xi 0 (no hardening) runs."""

    from diffmpm_cli.errors import SimulationError
    from diffmpm_cli.sim.grid import wave_speed
    from diffmpm_cli.sim.op import simulate
    from diffmpm_cli.sim.solver import Simulator

    E, nu, density = 2.0e4, 0.2, 400.0
    dt = 0.12 * GRID.dx / wave_speed(E, nu, density)
    model = make_model(material="snow", dt=dt, gravity=(0.0, 0.0, 0.0))
    x = 0.45 + 0.1 * torch.rand(20, 3, generator=torch.Generator().manual_seed(0))
    volume = torch.full((20,), (GRID.dx / 2) ** 3)
    sim = Simulator(model, mass=density * volume, volume=volume)

    def run(Jp0, hardening):
        return simulate(sim, x0=x, v0=torch.zeros(3), E=torch.tensor(E), nu=torch.tensor(nu), steps=2, Jp0=Jp0,
                        hardening=torch.tensor(hardening), critical_compression=torch.tensor(THETA_C),
                        critical_stretch=torch.tensor(THETA_S))

    run(torch.ones(20), 10.0)
    compacted = torch.ones(20)
    compacted[7] = 0.5
    run(compacted, 0.0)
    with pytest.raises(SimulationError) as refused:
        run(compacted, 10.0)
    line = str(refused.value)
    assert "\n" not in line and line.startswith("sim.dt: unstable time step: CFL number 1.4")
    assert "snow hardened x148 by exp(xi (1 - J_P)) at its J_P 0.5" in line
    stable = float(line.split("dt <= ")[1].split(" s")[0])
    assert stable == pytest.approx(dt * 0.5 / 1.46, rel=2e-2)


# ----------------------------------------------------------------------------------------------------------------
# check-grad's probe base for snow's controls


def test_check_grad_starts_snow_controls_inside_the_clamp_window(monkeypatch):
    """check-grad probes dFc around random control log strains. At 0.01 (the default) nearly every particle of the
    preset's snow (theta_s 7.5e-3) is clamped at the control step, the next steps' singular values straddle the bound
    1e-5..1e-3 apart, and central differences of the true clamp over check-grad's steps measure a chord there (AD
    -1.739 vs FD -1.687 on this 148-particle, 10-step free flight: 3.0 % against 0.5 % noise, with the plain frozen
    replay). Inside the window (0.25 theta_s) the same check passes (7e-4). check-grad's probes now linearise the
    clamp at the base rollout's F_trial (FrozenDecisions(linearise=True)): from the old base too the check then
    passes (9.1e-5 measured); the plain replay still fails there. The ball starts 5 cm higher than the scene's so
    that its stencil stays clear of the y-min wall's held row (0.1875 m on this grid, since the walls hold the
    particles' own face) over the 10 steps: a free flight (measured with the plain replay inside the window / with
    the old base: 5.0e-4 / 2.6e-2 with 3 probes, 9.5e-4 / 0.24 with 6; at the scene's height the wall acts and inside
    the window read 4.4e-3)."""
    from conftest import REPO

    from diffmpm_cli import gradcheck
    from diffmpm_cli.assets import build_assets
    from diffmpm_cli.config import load_scene
    from diffmpm_cli.pipeline import Pipeline

    scene = load_scene(REPO / "scenes" / "snowball_impact.yaml",
                       ["sim.grid_resolution=16", "sim.steps=10", "sim.control_stride=10", "sim.frames=[10]",
                        "source.center=[0.5, 0.4, 0.5]"])
    pipeline = Pipeline(scene, build_assets(scene))
    assert gradcheck._control_scale_limit(pipeline) == pytest.approx(0.25 * THETA_S)
    (row,) = gradcheck.check_stages(pipeline, stages=["sim"], groups=["dFc"], probes=3, coordinates=1)
    assert row.passed and row.worst_rel_error < 3e-3, row
    monkeypatch.setattr(gradcheck, "CLAMP_WINDOW_SHARE", math.inf)  # the old base: log strains of 0.01
    (row,) = gradcheck.check_stages(pipeline, stages=["sim"], groups=["dFc"], probes=3, coordinates=1)
    assert row.passed and row.worst_rel_error < 3e-3, row
    from diffmpm_cli.sim import solver

    monkeypatch.setattr(solver, "FrozenDecisions", lambda: FrozenDecisions(linearise=False))  # the plain replay
    (row,) = gradcheck.check_stages(pipeline, stages=["sim"], groups=["dFc"], probes=3, coordinates=1)
    assert not row.passed and row.worst_rel_error > 2e-2, row


def test_control_gradient_through_an_impact_is_the_twins_and_its_central_differences_need_steps_below_1e_5():
    """A snowball (136 particles, grid 16) thrown at 6 m/s hits the floor within 12 steps (J_P down to 0.78) from
    controls inside the clamp window: the gradient of a random-weight loss with respect to the controls equals the
    float64 twin's (autograd through torch's SVD; 2.8e-6 measured). The twin's own central differences (float64, every
    branch taken afresh) reach it only at steps of 1e-4..1e-5 per entry (-0.54607, -0.54609 vs -0.54609); at 1e-3
    they give -0.441 (19 % off), at 3e-3 +0.474. With the clamps opened (theta_c 0.9, theta_s 5; a 20-step variant)
    they were 1e-4 off at 1e-3. check-grad's float32 steps (~5e-3 down to 8e-5 per entry) cannot resolve that scale:
    why its probes linearise snow's clamp at the base rollout's F_trial (tests/test_snow_linearised.py)."""
    from conftest import REPO

    from diffmpm_cli.assets import build_assets
    from diffmpm_cli.config import load_scene
    from diffmpm_cli.pipeline import Pipeline
    from diffmpm_cli.reference.mpm import rollout_ref
    from diffmpm_cli.sim.grid import lame_parameters
    from diffmpm_cli.sim.op import material_kappa

    steps = 12
    # the floor holds the node row nearest its plane: 0.1875 m holds the rows these numbers were measured with (at
    # 0.25 the impact meets a row higher and central(1e-3) is 9.3 % off instead of 19 %)
    scene = load_scene(REPO / "scenes" / "snowball_impact.yaml",
                       ["sim.grid_resolution=16", f"sim.steps={steps}", f"sim.control_stride={steps}",
                        f"sim.frames=[{steps}]", "source.center=[0.5,0.36,0.5]", "sim.floor.height=0.1875",
                        "sim.initial_velocity=[0.0,-6.0,0.0]"])
    pipe = Pipeline(scene, build_assets(scene))
    source, n = pipe.assets.source, int(pipe.x0.shape[0])
    g = torch.Generator().manual_seed(0)
    dFc0 = 0.002 * torch.randn(1, n, 3, 3, generator=g, dtype=torch.float64)
    weights = {k: torch.randn(n, *((3,) if k in "xv" else (3, 3)), generator=g, dtype=torch.float64) for k in "xvFC"}
    m = scene.material
    mu, lam = lame_parameters(torch.full((n,), m.E, dtype=torch.float64), torch.full((n,), m.nu, dtype=torch.float64))
    kappa = material_kappa("snow", count=n, device="cpu", **{key: torch.tensor(getattr(m, key), dtype=torch.float64)
                                                             for key in ("hardening", "critical_compression",
                                                                         "critical_stretch")})
    start = {"x": pipe.x0.double(), "v": torch.tensor(scene.sim.initial_velocity, dtype=torch.float64).expand(n, 3),
             "F": torch.eye(3, dtype=torch.float64).expand(n, 3, 3), "C": torch.zeros(n, 3, 3, dtype=torch.float64)}

    def twin(dFc):
        out = rollout_ref(start, model=pipe.model, steps=steps, mass=source.masses.double(),
                          volume=source.volumes.double(), mu=mu, lam=lam, Fc=pipe.control_matrices(dFc), kappa=kappa,
                          node_mass_eps=pipe.sim.node_mass_eps)[-1]
        return sum((out[k] * weights[k]).sum() for k in "xvFC"), out

    leaf = dFc0.clone().requires_grad_(True)
    loss, out = twin(leaf)
    (v_ref,) = torch.autograd.grad(loss, leaf)
    assert float(out["Jp"].detach().min()) < 0.8  # the impact compacted it: the clamp acted
    leaf32 = dFc0.float().requires_grad_(True)
    result = pipe.simulate({"dFc": leaf32})
    (v_warp,) = torch.autograd.grad(sum((getattr(result, k)[-1].double() * weights[k]).sum() for k in "xvFC"), leaf32)
    assert float((v_warp.double() - v_ref).norm() / v_ref.norm()) < 1e-4
    u = torch.randn(dFc0.shape, generator=g, dtype=torch.float64)
    u /= u.norm()
    ad = float((v_ref * u).sum())

    def central(per_entry):
        h = per_entry * u.numel() ** 0.5
        with torch.no_grad():
            return (float(twin(dFc0 + h * u)[0]) - float(twin(dFc0 - h * u)[0])) / (2 * h)

    assert abs(central(1e-5) - ad) <= 1e-4 * abs(ad)
    assert abs(central(1e-3) - ad) >= 0.1 * abs(ad)


@pytest.mark.parametrize("graphs", [False, True])
def test_the_lowest_volume_ratio_record_starts_at_det_F0_times_Jp0(graphs):
    """A rollout's lowest-det-F record (the validity metrics' any-step minimum) starts from the whole starting volume
    ratio det F0 J_P0 of compacted snow, as G2P records it afterwards: snow at J_P0 0.5 and F0 = 0.98 I expanding
    (det F grows almost everywhere) reports det F0 J_P0 = 0.4706, not a later step's larger value (both rollout paths)."""
    from diffmpm_cli.sim.op import simulate
    from diffmpm_cli.sim.solver import Simulator

    model = make_model(material="snow", gravity=(0.0, 0.0, 0.0), dt=5e-4)
    state, mass, volume = make_particles(count=30, seed=3)
    n = len(mass)
    x = state["x"].float()
    sim = Simulator(model, mass=mass.float(), volume=volume.float(), graphs=graphs)
    F0 = 0.98 * torch.eye(3).expand(n, 3, 3)
    out = simulate(sim, x0=x, v0=2.0 * (x - x.mean(0)), F0=F0, Jp0=torch.full((n,), 0.5), E=torch.tensor(1e4),
                   nu=torch.tensor(0.3), steps=3, hardening=torch.tensor(3.0),
                   critical_compression=torch.tensor(THETA_C), critical_stretch=torch.tensor(THETA_S))
    start = 0.98**3 * 0.5
    assert float(out.stats.det_F_min.max()) == pytest.approx(start, rel=1e-5)  # the start is in every record
    assert float(out.stats.det_F_min.min()) > 0.99 * start  # a few particles near the wall compress a little
