"""Particles + F -> Gaussians: rest, rigid motion, stretch, the dense twin and VJPs."""

from __future__ import annotations

import math

import torch

from diffmpm_cli.reference.splats import surface_gaussians_ref
from diffmpm_cli.splats import embed_surface, particle_gaussians, surface_gaussians


def sphere_setup(M=200, N=300, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    particles = (torch.rand(N, 3, generator=g, dtype=dtype) - 0.5) * 0.3
    normals = torch.nn.functional.normalize(torch.randn(M, 3, generator=g, dtype=dtype), dim=1)
    samples = 0.15 * normals
    return samples, normals, particles


def rotation(angle: float, axis) -> torch.Tensor:
    axis = torch.nn.functional.normalize(torch.tensor(axis, dtype=torch.float64), dim=0)
    K = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def test_identity_gives_the_rest_samples_and_discs():
    samples, normals, particles = sphere_setup()
    emb = embed_surface(samples, normals, particles, neighbors=8)
    assert torch.allclose(emb.weights.sum(1), torch.ones(len(samples), dtype=torch.float64))
    F = torch.eye(3, dtype=torch.float64).expand(len(particles), 3, 3)
    means, covars = surface_gaussians(particles, F, emb, sigma0=torch.tensor(0.01, dtype=torch.float64), thickness=0.1)
    assert torch.allclose(means, samples, atol=1e-12)
    # a disc: sigma0^2 in the tangent plane, (t sigma0)^2 along the normal
    along = torch.einsum("mi,mij,mj->m", normals, covars, normals)
    assert torch.allclose(along, torch.full_like(along, (0.1 * 0.01) ** 2))
    assert torch.allclose(torch.einsum("mii->m", covars), torch.full_like(along, 0.01**2 * 2.01))


def test_rigid_motion_moves_means_and_rotates_covariances_exactly():
    samples, normals, particles = sphere_setup(seed=1)
    emb = embed_surface(samples, normals, particles, neighbors=6)
    R = rotation(0.8, [1.0, 2.0, -0.5])
    shift = torch.tensor([0.3, -0.1, 0.05], dtype=torch.float64)
    sigma0 = torch.tensor(0.02, dtype=torch.float64)
    F = R.expand(len(particles), 3, 3)
    means, covars = surface_gaussians(particles @ R.T + shift, F, emb, sigma0=sigma0, thickness=0.2)
    rest_means, rest_covars = surface_gaussians(particles, torch.eye(3, dtype=torch.float64).expand_as(F), emb,
                                                sigma0=sigma0, thickness=0.2)
    assert torch.allclose(means, rest_means @ R.T + shift, atol=1e-12)
    assert torch.allclose(covars, R @ rest_covars @ R.T, atol=1e-14)


def test_uniform_stretch_scales_covariances_as_F_Sigma0_FT():
    samples, normals, particles = sphere_setup(seed=2)
    emb = embed_surface(samples, normals, particles, neighbors=8)
    S = torch.diag(torch.tensor([1.3, 0.8, 1.1], dtype=torch.float64))
    F = S.expand(len(particles), 3, 3)
    sigma0 = torch.tensor(0.02, dtype=torch.float64)
    means, covars = surface_gaussians(particles @ S.T, F, emb, sigma0=sigma0, thickness=0.3)
    _, rest = surface_gaussians(particles, torch.eye(3, dtype=torch.float64).expand_as(F), emb, sigma0=sigma0,
                                thickness=0.3)
    assert torch.allclose(means, samples @ S.T, atol=1e-12)  # an affine map moves embedded points exactly
    assert torch.allclose(covars, S @ rest @ S.T, atol=1e-14)
    x, cov = particle_gaussians(particles, F, sigma0=sigma0)
    assert torch.allclose(cov, sigma0**2 * S @ S.T)


def test_matches_the_dense_twin_forward_and_by_random_cotangents():
    samples, normals, particles = sphere_setup(M=120, N=150, seed=3)
    emb = embed_surface(samples, normals, particles, neighbors=5)
    g = torch.Generator().manual_seed(4)
    x = (particles + 0.01 * torch.randn(particles.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    F = (torch.eye(3, dtype=torch.float64) + 0.1 * torch.randn(150, 3, 3, generator=g, dtype=torch.float64))
    F.requires_grad_(True)
    sigma0 = torch.tensor(0.02, dtype=torch.float64, requires_grad=True)
    v_means = torch.randn(120, 3, generator=g, dtype=torch.float64)
    v_cov = torch.randn(120, 3, 3, generator=g, dtype=torch.float64)
    m1, c1 = surface_gaussians(x, F, emb, sigma0=sigma0, thickness=0.1)
    m2, c2 = surface_gaussians_ref(x, F, samples_rest=samples, particles_rest=particles, indices=emb.indices,
                                   weights=emb.weights, normals=normals, sigma0=sigma0, thickness=0.1)
    assert torch.allclose(m1, m2, atol=1e-13) and torch.allclose(c1, c2, atol=1e-15)
    g1 = torch.autograd.grad((m1 * v_means).sum() + (c1 * v_cov).sum(), [x, F, sigma0])
    g2 = torch.autograd.grad((m2 * v_means).sum() + (c2 * v_cov).sum(), [x, F, sigma0])
    for a, b in zip(g1, g2, strict=True):
        assert float((a - b).norm() / b.norm()) <= 1e-10
