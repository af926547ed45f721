"""Herschel-Bulkley's return mapping (kernels/materials.py herschel_bulkley_F: Bingham's implicit viscoplastic step
with the overstress a power N of the plastic rate, solved by Newton's method, with an implicit-function-theorem
adjoint) against its float64 twin (reference/mpm.py herschel_bulkley_ref, autograd through 60 Newton iterations),
against Bingham at N = 1, against its own flow law, and against central differences of the float32 kernel."""

from __future__ import annotations

import pytest
import torch
from test_materials import mapping_vjp
from test_mpm import make_particles

from diffmpm_cli.reference.mpm import hencky_strain_ref, herschel_bulkley_ref, return_mapping_ref

MU, LAM, DT = 3846.0, 5769.0, 2e-3  # E 1e4 Pa, nu 0.3; the twin states yield in part at tau_Y 750 Pa
# (tau_Y [Pa], K [Pa s^N], N): shear thinning (toothpaste, ketchup ~0.3-0.5), Bingham, shear thickening
PARAMETERS = [(750.0, 5.0, 0.3), (750.0, 5.0, 0.6), (750.0, 5.0, 1.0), (750.0, 50.0, 1.6), (200.0, 0.5, 0.45)]


def kernel(func_name: str):
    import warp as wp
    from diffmpm_cli.kernels import materials

    func = getattr(materials, func_name)

    @wp.kernel(module="unique")
    def project(F: wp.array(dtype=wp.mat33), mu: float, lam: float, kappa: wp.array(dtype=wp.vec3),
                out: wp.array(dtype=wp.mat33)):
        i = wp.tid()
        out[i] = func(F[i], mu, lam, kappa[i], DT, materials.von_mises_branch(F[i], mu, lam, kappa[i][0]))

    return project


def states(count=120, seed=0):
    """F of make_particles (I + 0.05 noise) plus larger shears: deviatoric log strains 0.02-0.3, every particle's
    overstress S = 2 mu |e| - tau_Y from below yield to ~2e3 Pa."""
    state, _, _ = make_particles(count=count, seed=seed)
    scale = torch.linspace(0.3, 4.0, count, dtype=torch.float64)[:, None, None]
    eye = torch.eye(3, dtype=torch.float64)
    return eye + scale * (state["F"] - eye)


def run(func_name: str, Fs: torch.Tensor, k) -> torch.Tensor:
    import warp as wp

    out = wp.zeros(len(Fs), dtype=wp.mat33)
    kap = wp.array(torch.tensor(k, dtype=torch.float32).expand(len(Fs), 3).numpy(), dtype=wp.vec3)
    wp.launch(kernel(func_name), dim=len(Fs), inputs=[wp.array(Fs.float().numpy(), dtype=wp.mat33), MU, LAM, kap],
              outputs=[out])
    return torch.from_numpy(out.numpy()).double()


def deviatoric_norm(F: torch.Tensor) -> torch.Tensor:
    _, eps, _ = hencky_strain_ref(F)
    return (eps - eps.mean(-1, keepdim=True)).norm(dim=-1)


def test_the_states_yield_in_part():
    n = deviatoric_norm(states())
    share = float((n > 750.0 / (2 * MU)).double().mean())
    assert 0.3 < share < 0.9, share


@pytest.mark.parametrize("k", PARAMETERS)
def test_forward_matches_the_twin_and_obeys_its_flow_law(k):
    """Elementwise against the float64 twin (relative 1e-5); and the kernel's result obeys the law it solves, checked
    on its output alone: where the trial yields, the new |e| = rho satisfies 2 mu rho - tau_Y = K ((|e| - rho) / dt)^N
    (the deviatoric stress is tau_Y plus the power law of the plastic rate), and rho lies between r and |e|."""
    Fs = states()
    out = run("herschel_bulkley_F", Fs, k)
    ref = herschel_bulkley_ref(Fs, torch.full((len(Fs),), MU, dtype=torch.float64),
                               torch.tensor(k, dtype=torch.float64).expand(len(Fs), 3), DT)
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    tau_y, K, N = k
    n0, rho = deviatoric_norm(Fs), deviatoric_norm(out)
    yields = n0 > tau_y / (2 * MU)
    assert int(yields.sum()) > 20
    r = tau_y / (2 * MU)
    assert bool((rho[yields] >= r * (1 - 1e-4)).all() and (rho[yields] <= n0[yields] * (1 + 1e-5)).all())
    stress = 2 * MU * rho[yields] - tau_y
    law = K * ((n0[yields] - rho[yields]).clamp_min(0) / DT) ** N
    scale = 2 * MU * n0[yields] - tau_y  # the trial's overstress
    assert float(((stress - law).abs() / scale).max()) < 2e-3, float(((stress - law).abs() / scale).max())
    assert torch.equal(out[~yields], Fs[~yields].float().double())  # elastic below yield


def test_flow_index_one_is_bingham():
    """At N = 1 the map and its adjoint are Bingham's (bingham_F with viscosity eta = K) to float32 rounding."""
    Fs = states()
    for tau_y, K in ((750.0, 5.0), (200.0, 40.0)):
        hb, bingham = run("herschel_bulkley_F", Fs, (tau_y, K, 1.0)), run("bingham_F", Fs, (tau_y, K, 0.0))
        assert float((hb - bingham).abs().max()) < 1e-5
        cot = torch.randn(len(Fs), 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        gF_hb, gk_hb = mapping_vjp(kernel("herschel_bulkley_F"), Fs, torch.tensor([tau_y, K, 1.0]), cot, MU, LAM)
        gF_b, gk_b = mapping_vjp(kernel("bingham_F"), Fs, torch.tensor([tau_y, K, 0.0]), cot, MU, LAM)
        assert float((gF_hb - gF_b).norm() / gF_b.norm()) < 1e-4
        assert float((gk_hb[:, :2] - gk_b[:, :2]).norm() / gk_b[:, :2].norm()) < 1e-4


@pytest.mark.parametrize("k", PARAMETERS)
def test_adjoint_matches_the_twin_by_random_cotangents(k):
    """The implicit-function-theorem adjoint (F, tau_Y, K, N, and mu through a per-particle mu) against autograd
    through the twin's Newton iterations, contracted with random cotangents."""
    import warp as wp
    from diffmpm_cli.kernels import materials

    Fs = states()
    count = len(Fs)
    cot = torch.randn(count, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kk = torch.tensor(k, dtype=torch.float64)
    grad_F, grad_k = mapping_vjp(kernel("herschel_bulkley_F"), Fs, kk, cot, MU, LAM)

    F_ref = Fs.clone().requires_grad_(True)
    k_ref = kk.expand(count, 3).clone().requires_grad_(True)
    mu_ref = torch.full((count,), MU, dtype=torch.float64, requires_grad=True)
    (herschel_bulkley_ref(F_ref, mu_ref, k_ref, DT) * cot).sum().backward()
    assert float((grad_F - F_ref.grad).norm() / F_ref.grad.norm()) < 2e-3
    for j in range(3):  # tau_Y, K, N
        err = float((grad_k[:, j] - k_ref.grad[:, j]).norm() / k_ref.grad[:, j].norm())
        assert err < 2e-3, (j, err)
    assert float(k_ref.grad[:, 2].abs().max()) > 0  # N is a lever (its gradient exists, though N is not learned)

    @wp.kernel(module="unique")
    def project_mu(F: wp.array(dtype=wp.mat33), mu: wp.array(dtype=float), kappa: wp.array(dtype=wp.vec3),
                   out: wp.array(dtype=wp.mat33)):
        i = wp.tid()
        out[i] = materials.herschel_bulkley_F(F[i], mu[i], LAM, kappa[i], DT,
                                              materials.von_mises_branch(F[i], mu[i], LAM, kappa[i][0]))

    F = wp.array(Fs.float().numpy(), dtype=wp.mat33)
    mu = wp.array(torch.full((count,), MU).numpy(), dtype=float, requires_grad=True)
    kap = wp.array(kk.float().expand(count, 3).numpy(), dtype=wp.vec3)
    out = wp.zeros(count, dtype=wp.mat33, requires_grad=True)
    tape = wp.Tape()
    with tape:
        wp.launch(project_mu, dim=count, inputs=[F, mu, kap], outputs=[out])
    tape.backward(grads={out: wp.array(cot.float().numpy(), dtype=wp.mat33)})
    grad_mu = torch.from_numpy(mu.grad.numpy()).double()
    assert float((grad_mu - mu_ref.grad).norm() / mu_ref.grad.norm()) < 2e-3


@pytest.mark.parametrize("k", [PARAMETERS[0], PARAMETERS[3]])
def test_adjoint_matches_central_differences_of_the_kernel(k):
    """The adjoint against central differences of the float32 kernel itself, through a random-weight sum over states
    at least 1.5 times past yield (no branch flips within the steps): relative steps 5e-2 in tau_Y and K, 1e-2 in N,
    1e-3 along a random direction of F; within 1 % plus 0.1 % of the largest log-parameter derivative (at N = 1.6,
    K = 50 tau_Y barely acts: 4.6e-7 against 0.16 for log N). Measured: tau_Y 2.0742e-4 vs 2.0743e-4, K 1.5034e-3 vs
    1.5031e-3, N 4.4576e-2 vs 4.4952e-2 (N = 0.3); N 9.8649e-2 vs 9.8674e-2 (N = 1.6)."""
    Fs = states()
    Fs = Fs[deviatoric_norm(Fs) > 1.5 * k[0] / (2 * MU)]
    cot = torch.randn(len(Fs), 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kk = torch.tensor(k, dtype=torch.float64)
    grad_F, grad_k = mapping_vjp(kernel("herschel_bulkley_F"), Fs, kk, cot, MU, LAM)
    ad = grad_k.sum(0)
    largest = float((kk * ad).abs().max())  # d loss / d log(parameter), the largest of the three

    def loss(F_, k_):
        return float((run("herschel_bulkley_F", F_, tuple(float(v) for v in k_)) * cot).sum())

    for j, rel in enumerate((5e-2, 5e-2, 1e-2)):
        step = rel * float(kk[j])
        e = torch.zeros(3, dtype=torch.float64)
        e[j] = step
        fd = (loss(Fs, kk + e) - loss(Fs, kk - e)) / (2 * step)
        assert abs(float(ad[j]) - fd) <= 1e-2 * abs(fd) + 1e-3 * largest / float(kk[j]), (j, float(ad[j]), fd)
    u = torch.randn(len(Fs), 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    h = 1e-3
    fd = (loss(Fs + h * u, kk) - loss(Fs - h * u, kk)) / (2 * h)
    assert abs(float((grad_F * u).sum()) - fd) <= 1e-2 * abs(fd), (float((grad_F * u).sum()), fd)


def test_twin_at_flow_index_one_is_the_bingham_twin():
    Fs = states()
    count = len(Fs)
    mu = torch.full((count,), MU, dtype=torch.float64)
    hb = herschel_bulkley_ref(Fs, mu, torch.tensor([750.0, 5.0, 1.0], dtype=torch.float64).expand(count, 3), DT)
    bingham = return_mapping_ref(Fs, mu, torch.full((count,), LAM, dtype=torch.float64),
                                 torch.tensor([750.0, 5.0, 0.0], dtype=torch.float64).expand(count, 3), "bingham",
                                 dt=DT)
    assert float((hb - bingham).abs().max()) < 1e-12
