"""Cohesion of the drucker_prager sand (material.cohesion c [Pa]): the cone's apex moves into tension, to the mean
Kirchhoff stress a = c cot(phi) (kernels/plastic.py drucker_prager_F_k, kappa[1] = a). c = 0 reproduces the
cohesionless model bit for bit; at c > 0 the kernels match the float64 twin (forward, VJP by random cotangents,
central differences with frozen branches) and a cohesive column stands where a cohesionless one collapses."""

from __future__ import annotations

import hashlib
import math
import platform

import pytest
import torch
from test_materials import energy, frozen_rollout_probes_agree, lattice, on_the_floor, rollout_vjps, slab
from test_mpm import FIELDS, assert_frames_match_twin, make_model, make_particles, rel_error

from diffmpm_cli.enums import Material
from diffmpm_cli.reference.mpm import hencky_strain_ref, return_mapping_ref, rollout_ref
from diffmpm_cli.sim.grid import lame_parameters
from diffmpm_cli.sim.op import drucker_prager_alpha, drucker_prager_apex, material_kappa, simulate
from diffmpm_cli.sim.solver import Simulator

PHI = 30.0  # degrees
COHESION = 150.0  # Pa: with E 1e4, nu 0.3 (2 mu + 3 lam = 25 kPa) the apex lies at s = 0.0104 log strain per axis


# ----------------------------------------------------------------------------------------------------------------
# c = 0: the cohesionless model, bit for bit


def _unit_rollout(**cohesion):
    """A 10-step sand rollout of random states (every branch taken, test_materials) with controls, a floor and
    per-particle E: its frames and the VJP of a random cotangent to every input (float32 tensors)."""
    model = make_model(material="drucker_prager", control_stride=2, floor_enabled=True, floor_normal=(0.0, 1.0, 0.0),
                       floor_height=0.3, friction=0.4)
    state, mass, volume = make_particles(count=120, seed=0)
    g = torch.Generator().manual_seed(5)
    leaves = {"x0": state["x"].float(), "v0": state["v"].float(), "F0": state["F"].float(), "C0": state["C"].float(),
              "Fc": (torch.eye(3) + 0.02 * torch.randn(5, 120, 3, 3, generator=g)).float(),
              "E": torch.full((120,), 1.0e4), "nu": torch.full((120,), 0.3), "friction_angle": torch.full((120,), PHI)}
    leaves = {k: v.clone().requires_grad_(True) for k, v in leaves.items()}
    sim = Simulator(model, mass=mass.float(), volume=volume.float())
    result = simulate(sim, steps=10, frames=[5], **leaves, **cohesion)
    cot = {n: torch.randn(getattr(result, n).shape, generator=g) for n in FIELDS}
    total = sum((getattr(result, n) * cot[n]).sum() for n in FIELDS)
    grads = torch.autograd.grad(total, list(leaves.values()))
    out = {n: getattr(result, n).detach() for n in FIELDS}
    out.update({f"d{k}": gr for k, gr in zip(leaves, grads, strict=True)})
    return out


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().numpy().tobytes())
    return h.hexdigest()


# _unit_rollout() of the code before cohesion existed (ea95a12), Warp 1.19.0 on this x86_64 CPU: forward frames and
# every input's gradient (the same script compared with the new code: equal bit for bit, as are the shipped scenes
# sand_collapse and jelly_on_sand, forward)
BEFORE_COHESION = "dd553012a543f1d510a3c3683693b87114015cedf4403c27f60f2661c19cc587"


def test_without_cohesion_the_results_are_todays_bit_for_bit():
    import warp as wp

    kappa = material_kappa(Material.DRUCKER_PRAGER, count=4, device="cpu", friction_angle=torch.tensor(PHI))
    assert torch.equal(kappa[:, 1], torch.zeros(4)) and torch.equal(kappa[:, 2], torch.zeros(4))
    default = _unit_rollout()
    zero = _unit_rollout(cohesion=torch.tensor(0.0))
    for key in default:
        assert torch.equal(default[key].view(torch.int32), zero[key].view(torch.int32)), key
    if wp.__version__ != "1.19.0" or platform.machine() != "x86_64":
        pytest.skip("the recorded digest is of Warp 1.19.0 on x86_64")
    assert _digest(default) == BEFORE_COHESION


# ----------------------------------------------------------------------------------------------------------------
# the return mapping against the float64 twin


def _cohesive_states(count=300, seed=1):
    """Random F (a third near-isotropically compressed: elastic; the rest stretched or sheared: apex and cone) and
    per-particle E in 0.8e4..1.2e4 Pa, nu 0.3, phi 30 deg, c 150 Pa (float64)."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(3, dtype=torch.float64)
    F = eye + 0.06 * torch.randn(count, 3, 3, generator=g, dtype=torch.float64)
    third = count // 3
    F[:third] = 0.95 * eye + 0.015 * torch.randn(third, 3, 3, generator=g, dtype=torch.float64)
    E = 0.8e4 + 0.4e4 * torch.rand(count, generator=g, dtype=torch.float64)
    mu, lam = lame_parameters(E, torch.full((count,), 0.3, dtype=torch.float64))
    phi = torch.full((count,), PHI, dtype=torch.float64)
    k = torch.stack([drucker_prager_alpha(phi), drucker_prager_apex(torch.full_like(phi, COHESION), phi)], -1)
    return F, mu, lam, k


def _project_kernel():
    import warp as wp
    from diffmpm_cli.kernels.materials import KERNEL_MODELS

    mapping, branch_of = KERNEL_MODELS[Material.DRUCKER_PRAGER][1:]

    @wp.kernel(module="unique")
    def project(F: wp.array(dtype=wp.mat33), mu: wp.array(dtype=float), lam: wp.array(dtype=float),
                k: wp.array(dtype=wp.vec3), out: wp.array(dtype=wp.mat33), branch: wp.array(dtype=int)):
        i = wp.tid()
        b = branch_of(F[i], mu[i], lam[i], k[i])
        branch[i] = b
        out[i] = mapping(F[i], mu[i], lam[i], k[i], 0.0, b)

    return project


def _warp_projection(F, mu, lam, k, cot=None):
    """(F+ [N, 3, 3], branch [N], and with a cotangent the gradients (F, mu, lam, k [N, 2])) of the kernels' return
    mapping (float32)."""
    import warp as wp

    n = len(F)
    arrays = {"F": wp.array(F.float().numpy(), dtype=wp.mat33, requires_grad=True),
              "mu": wp.array(mu.float().numpy(), dtype=float, requires_grad=True),
              "lam": wp.array(lam.float().numpy(), dtype=float, requires_grad=True),
              "k": wp.array(torch.cat([k, torch.zeros(n, 1, dtype=k.dtype)], 1).float().numpy(), dtype=wp.vec3,
                            requires_grad=True)}
    out = wp.zeros(n, dtype=wp.mat33, requires_grad=True)
    branch = wp.zeros(n, dtype=int)
    tape = wp.Tape()
    with tape:
        wp.launch(_project_kernel(), dim=n, inputs=[arrays["F"], arrays["mu"], arrays["lam"], arrays["k"]],
                  outputs=[out, branch])
    result = (torch.from_numpy(out.numpy()).double(), torch.from_numpy(branch.numpy()))
    if cot is None:
        return result
    tape.backward(grads={out: wp.array(cot.float().numpy(), dtype=wp.mat33)})
    grads = {name: torch.from_numpy(a.grad.numpy()).double() for name, a in arrays.items()}
    grads["k"] = grads["k"][:, :2]
    return (*result, grads)


def test_return_mapping_matches_the_twin_on_every_branch():
    """Forward of the kernels' map at c = 150 Pa against return_mapping_ref: each branch taken by >= 40 of 300
    states, and >= 20 states whose branch the apex changed (tension at c = 0, cone or elastic here)."""
    from diffmpm_cli.kernels.plastic import ELASTIC, TENSION, YIELD

    F, mu, lam, k = _cohesive_states()
    out, branch = _warp_projection(F, mu, lam, k)
    ref = return_mapping_ref(F, mu, lam, torch.cat([k, torch.zeros(len(F), 1, dtype=k.dtype)], 1), "drucker_prager")
    for b in (ELASTIC, YIELD, TENSION):
        assert int((branch == b).sum()) >= 40, (b, torch.bincount(branch))
    _, cohesionless = _warp_projection(F, mu, lam, k * torch.tensor([1.0, 0.0], dtype=k.dtype))
    assert int(((cohesionless == TENSION) & (branch != TENSION)).sum()) >= 20
    err = rel_error(out, ref)
    assert err <= 1e-5, err
    apex = branch == TENSION  # at the apex: e^s U V^T, stress a I (tension held), not the stress-free U V^T
    _, eps, _ = hencky_strain_ref(out[apex])
    s = k[apex, 1] / (2 * mu[apex] + 3 * lam[apex])
    assert torch.allclose(eps, s[:, None].expand(-1, 3), atol=2e-6)


def test_return_mapping_vjp_matches_the_twin_per_branch():
    """Random cotangents: d/dF, d/dmu, d/dlam, d/dalpha and d/da (kappa[1]) of the kernels' hand-written adjoint
    against autograd through the twin, per branch (relative L2 <= 1e-4; measured <= 9.3e-6)."""
    from diffmpm_cli.kernels.plastic import ELASTIC, TENSION, YIELD

    F, mu, lam, k = _cohesive_states(seed=2)
    cot = torch.randn(F.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _, branch, v_warp = _warp_projection(F, mu, lam, k, cot)
    leaves = {"F": F, "mu": mu, "lam": lam, "k": k}
    leaves = {name: v.clone().requires_grad_(True) for name, v in leaves.items()}
    kappa = torch.cat([leaves["k"], torch.zeros(len(F), 1, dtype=k.dtype)], 1)
    ref = return_mapping_ref(leaves["F"], leaves["mu"], leaves["lam"], kappa, "drucker_prager")
    v_ref = dict(zip(leaves, torch.autograd.grad((ref * cot).sum(), list(leaves.values())), strict=True))
    for b in (TENSION, YIELD):
        rows = branch == b
        for name in leaves:
            got, want = v_warp[name][rows], v_ref[name][rows]
            if name == "k" and b == TENSION:  # d/dalpha is 0 at the apex; d/da is not
                assert torch.equal(got[:, 0], torch.zeros_like(got[:, 0]))
                got, want = got[:, 1], want[:, 1]
            err = float((got - want).norm() / want.norm())
            assert err <= 1e-4, f"branch {b}: d/d{name} relative L2 error {err:.2e}"
    rows = branch == ELASTIC
    assert float((v_warp["F"][rows] - cot[rows]).abs().max()) < 1e-6
    for name in ("mu", "lam", "k"):
        assert torch.equal(v_warp[name][rows], torch.zeros_like(v_warp[name][rows])), name


# ----------------------------------------------------------------------------------------------------------------
# rollouts: the twin and finite differences


def test_rollout_matches_the_twin():
    model = make_model(material="drucker_prager", floor_enabled=True, floor_normal=(0.0, 1.0, 0.0), floor_height=0.3,
                       friction=0.4)
    state, mass, volume = make_particles()
    E, nu = torch.full((120,), 1.0e4, dtype=torch.float64), torch.full((120,), 0.3, dtype=torch.float64)
    E[:60] = 2.0e4
    extra = {"friction_angle": torch.tensor(PHI, dtype=torch.float64),
             "cohesion": torch.tensor(COHESION, dtype=torch.float64)}
    sim = Simulator(model, mass=mass.float(), volume=volume.float())
    result = simulate(sim, x0=state["x"].float(), v0=state["v"].float(), F0=state["F"].float(),
                      C0=state["C"].float(), E=E.float(), nu=nu.float(), steps=20, frames=[1],
                      **{key: value.float() for key, value in extra.items()})
    mu, lam = lame_parameters(E, nu)
    kappa = material_kappa("drucker_prager", count=120, device="cpu", **extra).double()
    assert float(kappa[:, 1].min()) > 250.0  # a = c cot(30 deg) = 259.8 Pa
    ref = rollout_ref(state, model=model, steps=20, mass=mass, volume=volume, mu=mu, lam=lam, kappa=kappa,
                      node_mass_eps=sim.node_mass_eps, frames=[1])
    assert_frames_match_twin(result, ref, [(1, 1e-4), (20, 2e-3)])


def test_rollout_vjp_matches_the_twin():
    """Random cotangents over 6 steps in 3 segments with controls (test_materials.rollout_vjps): every input
    including friction_angle and cohesion, per particle, through material_kappa (a = c cot phi) into the kernels'
    kappa[0] and kappa[1]."""
    extra = {"friction_angle": torch.full((60,), PHI, dtype=torch.float64),
             "cohesion": torch.full((60,), COHESION, dtype=torch.float64)}

    def kappa_of(leaves):
        return material_kappa("drucker_prager", count=60, device="cpu", friction_angle=leaves["friction_angle"],
                              cohesion=leaves["cohesion"])

    inputs, _, v_warp, v_ref = rollout_vjps(make_model(material="drucker_prager", control_stride=2), extra,
                                            device="cpu", kappa_of=kappa_of)
    for key in inputs:
        err = float((v_warp[key].double() - v_ref[key]).norm() / v_ref[key].norm())
        assert err <= 2e-3, f"d/d{key}: relative L2 error {err:.2e}"


def test_finite_differences_through_the_kernels():
    """log E, nu, the friction angle [degrees] and log c over 24 steps with gravity, a wall band and a frame, at c =
    400 Pa: autodiff against central differences of the float32 kernels, the base rollout's branches frozen
    (test_materials.frozen_rollout_probes_agree). (At 150 Pa this loss hardly depends on c: d/dlog c = -0.067 against
    a measured FD noise of 0.015-0.037, and the probe's step halves to noise; central differences of c itself over
    +-8 Pa there gave -4.498e-4 against AD's -4.513e-4.)"""
    model = make_model(material="drucker_prager", dt=2e-3)
    state, mass, volume = make_particles(count=80, seed=4)
    sim = Simulator(model, mass=mass.float(), volume=volume.float())
    weights = {n: torch.randn(2, 80, *((3,) if n in "xv" else (3, 3)), generator=torch.Generator().manual_seed(9),
                              dtype=torch.float64) for n in FIELDS}
    params = {"log_E": torch.tensor(math.log(1.0e4)), "nu": torch.tensor(0.3), "friction_angle": torch.tensor(PHI),
              "log_c": torch.tensor(math.log(400.0))}
    eps = {"log_E": 2e-2, "nu": 4e-3, "friction_angle": 1.0, "log_c": 0.2}
    frozen_rollout_probes_agree(sim, state, weights, params, eps,
                                lambda p: {"friction_angle": p["friction_angle"], "cohesion": torch.exp(p["log_c"])})


# ----------------------------------------------------------------------------------------------------------------
# physics: a cohesive column stands


def sand_column(cohesion: float, steps: int = 400):
    """A quasi-2D sand column 0.12 m wide and 0.24 m high (phi 30 deg, E 3e4 Pa, 1500 kg/m^3) released on a rough
    floor: (95th percentile of its height at the end [m], its width at the end [m], energies of 6 frames [J])."""
    grid = slab(48, height_cells=24)
    floor = 4 * grid.dx
    x = lattice((0.44, floor, 3 * grid.dx), (0.56, floor + 0.24, 5 * grid.dx), grid.dx / 2)
    sim, mass, volume, E, nu = on_the_floor(grid, x, material="drucker_prager", density=1500.0, E=3.0e4, dt=1e-3,
                                            floor=floor, friction=0.8)
    frames = list(range(0, steps + 1, steps // 5))
    out = simulate(sim, x0=x.float(), v0=torch.zeros(3), E=E.float(), nu=nu.float(), steps=steps, frames=frames,
                   friction_angle=torch.tensor(PHI), cohesion=torch.tensor(cohesion))
    mu, lam = lame_parameters(E, nu)
    energies = [energy(out, r, material="drucker_prager", mass=mass, volume=volume, mu=mu, lam=lam, gravity=9.81)
                for r in range(len(frames))]
    final = out.x[-1].double()
    height = float(torch.quantile(final[:, 1] - floor, 0.95))
    return height, float(final[:, 0].max() - final[:, 0].min()), energies


def test_a_cohesive_column_stands_where_a_cohesionless_one_collapses():
    """Rankine's critical height of a vertical cut, 4 c tan(45 + phi / 2) / (rho g), is 0.24 m at c ~ 510 Pa.
    Measured (400 steps, 1,104 particles): the 95th-percentile height 0.085 m at c = 0 (spread to 0.451 m wide),
    0.132 m at 200 Pa (0.229 m), 0.207 m at 500 Pa (0.128 m) and 0.220 m at 1 kPa (0.116 m wide: it stands, settling
    elastically); energy falls in each (c = 0: 3.730 -> 2.286 J; 1 kPa: 3.730 -> 3.722 J)."""
    results = {c: sand_column(c) for c in (0.0, 200.0, 1000.0)}
    (h0, w0, _), (h1, _, _), (h2, w2, _) = results[0.0], results[200.0], results[1000.0]
    assert h0 < 0.5 * 0.24 and w0 > 3 * 0.12, (h0, w0)  # collapses and spreads
    assert h0 + 0.02 < h1 < h2 - 0.02, (h0, h1, h2)  # more cohesion, more height kept
    assert h2 > 0.85 * 0.24 and w2 < 1.05 * 0.12, (h2, w2)  # stands (settling elastically)
    for c, (_, _, energies) in results.items():
        assert all(b <= a + 1e-3 * abs(energies[0]) for a, b in zip(energies, energies[1:])), (c, energies)


# ----------------------------------------------------------------------------------------------------------------
# the scene file


def _sand_scene(material=None, regions=()):
    from conftest import BASE_SCENE

    base = {"model": "drucker_prager", "E": 2.0e4, "nu": 0.3, "density": 1000.0, "friction_angle": PHI}
    return {**BASE_SCENE, "material": {**base, **(material or {}), "regions": list(regions)}}


def test_scene_cohesion_is_checked_with_one_error_line(write_scene):
    from typer.testing import CliRunner

    from diffmpm_cli.cli import app

    region = {"shape": {"shape": "box", "size": [0.4, 0.15, 0.4], "center": [0.5, 0.425, 0.5]}}
    cases = [
        (_sand_scene({"cohesion": -5.0}), "error: material.cohesion: "),
        (_sand_scene({"model": "von_mises", "yield_stress": 500.0, "friction_angle": None, "cohesion": 100.0}),
         "error: material.cohesion: is not a parameter of material.model von_mises"),
        (_sand_scene(regions=[{**region, "cohesion": -1.0}]), "error: material.regions[0].cohesion: "),
        (_sand_scene(regions=[{**region, "model": "von_mises", "yield_stress": 500.0, "cohesion": 10.0}]),
         "error: material.regions[0].cohesion: is not a parameter of its model von_mises"),
    ]
    for scene, message in cases:
        result = CliRunner().invoke(app, ["validate", str(write_scene(scene))])
        assert result.exit_code == 2, (message, result.output)
        lines = [line for line in result.output.strip().splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith(message), (message, result.output)
    for scene in (_sand_scene({"cohesion": 300.0}), _sand_scene(regions=[{**region, "cohesion": 50.0}])):
        result = CliRunner().invoke(app, ["validate", str(write_scene(scene))])
        assert result.exit_code == 0, result.output


def test_a_regions_cohesion_reaches_its_particles(write_scene):
    from diffmpm_cli.assets import build_assets
    from diffmpm_cli.config import load_scene
    from diffmpm_cli.pipeline import Pipeline

    region = {"shape": {"shape": "box", "size": [0.4, 0.15, 0.4], "center": [0.5, 0.425, 0.5]}, "cohesion": 50.0}
    scene = load_scene(write_scene(_sand_scene({"cohesion": 300.0}, regions=[region])))
    assets = build_assets(scene)
    pipeline = Pipeline(scene, assets)
    inside = assets.source.region == 0
    assert 0 < int(inside.sum()) < len(inside)
    values = pipeline.region_values["cohesion"]
    assert torch.equal(values[inside], torch.full((int(inside.sum()),), 50.0))
    assert torch.equal(values[~inside], torch.full((int((~inside).sum()),), 300.0))
    assert pipeline.material_parameters == ("friction_angle", "cohesion")  # learnable (tests/test_learn_cohesion.py)
