"""Float64 twin of particles -> surface Gaussians with a dense weight matrix (every sample against every particle)."""

from __future__ import annotations

import torch


def surface_gaussians_ref(x, F, *, samples_rest, particles_rest, indices, weights, normals, sigma0, thickness):
    """mu_j = sum_p W_jp (x_p + F_p (X_j - X_p)), Sigma_j = Fbar_j Sigma0_j Fbar_j^T with a dense W [M, N]."""
    M, N = samples_rest.shape[0], particles_rest.shape[0]
    W = torch.zeros(M, N, dtype=x.dtype)
    W.scatter_(1, indices, weights.to(x.dtype))
    offsets = samples_rest[:, None, :] - particles_rest[None, :, :]  # [M, N, 3]
    moved = x[None, :, :] + torch.einsum("pij,mpj->mpi", F, offsets)
    means = torch.einsum("mp,mpi->mi", W, moved)
    Fbar = torch.einsum("mp,pij->mij", W, F)
    eye = torch.eye(3, dtype=x.dtype)
    rest = sigma0**2 * (eye - (1 - thickness**2) * torch.einsum("mi,mj->mij", normals, normals))
    return means, Fbar @ rest @ Fbar.transpose(1, 2)
