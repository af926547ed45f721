"""Particles + deformation gradients -> Gaussians (means and covariances), differentiable in torch.

Surface mode: M samples X_j of the source surface (rest configuration, normals n_j) are each bound to their k
nearest particles X_p with fixed inverse-distance weights w_jp. At run time
    mu_j = sum_p w_jp (x_p + F_p (X_j - X_p)),   Sigma_j = Fbar_j Sigma0_j Fbar_j^T,   Fbar_j = sum_p w_jp F_p,
with Sigma0_j = sigma0^2 (I - (1 - t^2) n_j n_j^T): a disc of radius sigma0 in the tangent plane and thickness
t sigma0 along the normal. Particle mode: one Gaussian per particle, mu_p = x_p, Sigma_p = sigma0^2 F_p F_p^T.
Neighbours and weights are chosen once at rest, so nothing non-differentiable happens at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SIGMA0_FACTOR = 0.5  # default rest size of a Gaussian per sample spacing (default_sigma0)
NEIGHBOR_CHUNK = 4096  # surface samples per distance block when searching neighbours


@dataclass
class SurfaceEmbedding:
    """Rest-state binding of M surface Gaussians to particles: indices [M, k], weights [M, k] (rows sum to 1),
    offsets X_j - X_p [M, k, 3] (m) and rest normals [M, 3]."""

    indices: torch.Tensor
    weights: torch.Tensor
    offsets: torch.Tensor
    normals: torch.Tensor

    @property
    def gaussian_count(self) -> int:
        return int(self.indices.shape[0])

    def to(self, dtype: torch.dtype) -> SurfaceEmbedding:
        return SurfaceEmbedding(indices=self.indices, weights=self.weights.to(dtype), offsets=self.offsets.to(dtype),
                                normals=self.normals.to(dtype))


def embed_surface(samples: torch.Tensor, normals: torch.Tensor, particles: torch.Tensor, *, neighbors: int,
                  eps: float = 1e-6) -> SurfaceEmbedding:
    """Bind surface samples [M, 3] (with unit normals [M, 3]) to their ``neighbors`` nearest rest particles [N, 3].

    Weights are 1 / (distance + eps), normalised per sample (eps in m keeps a sample on a particle finite).
    """
    k = min(neighbors, particles.shape[0])
    idx, dist = [], []
    for start in range(0, samples.shape[0], NEIGHBOR_CHUNK):
        d = torch.cdist(samples[start:start + NEIGHBOR_CHUNK], particles)
        values, indices = torch.topk(d, k, dim=1, largest=False)
        idx.append(indices)
        dist.append(values)
    indices = torch.cat(idx) if idx else torch.zeros(0, k, dtype=torch.long, device=samples.device)
    distances = torch.cat(dist) if dist else torch.zeros(0, k, device=samples.device)
    weights = 1.0 / (distances + eps)
    weights = weights / weights.sum(dim=1, keepdim=True)
    offsets = samples[:, None, :] - particles[indices]
    return SurfaceEmbedding(indices=indices, weights=weights, offsets=offsets, normals=normals)


def surface_gaussians(x: torch.Tensor, F: torch.Tensor, embedding: SurfaceEmbedding, *, sigma0: torch.Tensor,
                      thickness: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Means [M, 3] and covariances [M, 3, 3] of surface Gaussians for particle positions x [N, 3] and F [N, 3, 3]."""
    w = embedding.weights[..., None]
    Fn = F[embedding.indices]  # [M, k, 3, 3]
    means = (w * (x[embedding.indices] + (Fn @ embedding.offsets[..., None])[..., 0])).sum(dim=1)
    Fbar = (embedding.weights[..., None, None] * Fn).sum(dim=1)
    rest = rest_covariances(embedding.normals, sigma0=sigma0, thickness=thickness)
    return means, Fbar @ rest @ Fbar.transpose(1, 2)


def rest_covariances(normals: torch.Tensor, *, sigma0, thickness: float) -> torch.Tensor:
    """Rest covariances [M, 3, 3] m^2 of surface discs with unit normals [M, 3]: sigma0^2 (I - (1 - t^2) n n^T), a
    disc of radius sigma0 [m] (a number or a tensor) in the tangent plane, t sigma0 thick along the normal."""
    eye = torch.eye(3, dtype=normals.dtype, device=normals.device)
    return sigma0**2 * (eye - (1.0 - thickness**2) * normals[:, :, None] * normals[:, None, :])


def particle_gaussians(x: torch.Tensor, F: torch.Tensor, *, sigma0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One Gaussian per particle: means x [N, 3], covariances sigma0^2 F F^T [N, 3, 3]."""
    return x, sigma0**2 * F @ F.transpose(1, 2)


def splat_gaussians(x: torch.Tensor, F: torch.Tensor, embedding: SurfaceEmbedding | None, *, sigma0: torch.Tensor,
                    thickness: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Means and covariances of a state's Gaussians: surface Gaussians with an embedding, else one per particle."""
    if embedding is not None:
        return surface_gaussians(x, F, embedding, sigma0=sigma0, thickness=thickness)
    return particle_gaussians(x, F, sigma0=sigma0)


def default_sigma0(*, mode: str, surface_area: float, samples: int, spacing: float) -> float:
    """A rest size [m] from the sampling density: 0.5 x the mean spacing of (blue-noise) surface samples (surface
    mode), or 0.5 x the particle spacing (particle mode), so neighbouring Gaussians overlap without hand tuning.

    0.5 is the smallest factor measured free of holes: on sphere_to_cat's target at 512^2, 0.5 misses 0.03 % of the
    exact silhouette's pixels (thin tips), 0.45 opens scattered one-pixel holes (0.18 %), 0.4 more (0.9 %). Smaller
    is sharper: at 256^2 with 5000 samples the target's Gaussians score 0.938 (0.6 x), 0.956 (0.5 x) against the
    exact mesh; the excess is a band of partly covered pixels along the silhouette, which more samples narrow."""
    if mode == "surface":
        return SIGMA0_FACTOR * math.sqrt(surface_area / max(samples, 1))
    return SIGMA0_FACTOR * spacing
