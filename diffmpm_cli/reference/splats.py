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


def trained_gaussians_ref(x, F, *, samples_rest, particles_rest, indices, weights, rest_covars, sigma0):
    """A trained 3DGS source's Gaussians with a dense W [M, N]: mu_j as above, Sigma_j = Fbar_j (sigma0^2 S_j)
    Fbar_j^T with the trained rest covariances S_j [M, 3, 3]; also returns Fbar [M, 3, 3]."""
    M, N = samples_rest.shape[0], particles_rest.shape[0]
    W = torch.zeros(M, N, dtype=x.dtype)
    W.scatter_(1, indices, weights.to(x.dtype))
    offsets = samples_rest[:, None, :] - particles_rest[None, :, :]
    means = torch.einsum("mp,mpi->mi", W, x[None, :, :] + torch.einsum("pij,mpj->mpi", F, offsets))
    Fbar = torch.einsum("mp,pij->mij", W, F)
    return means, Fbar @ (sigma0**2 * rest_covars) @ Fbar.transpose(1, 2), Fbar


def _inverse3(A):
    """The inverse of a 3x3 matrix by its adjugate (cofactors) over the determinant."""
    a, b, c = A[0]
    d, e, f = A[1]
    g, h, i = A[2]
    cof = torch.stack([torch.stack([e * i - f * h, c * h - b * i, b * f - c * e]),
                       torch.stack([f * g - d * i, a * i - c * g, c * d - a * f]),
                       torch.stack([d * h - e * g, b * g - a * h, a * e - b * d])])
    return cof / (a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g))


def eval_sh_ref(degree, sh, d):
    """The 3DGS ``eval_sh`` (utils/sh_utils.py) for one direction d [3] and coefficients sh [(degree+1)^2, 3]."""
    C0, C1 = 0.28209479177387814, 0.4886025119029199
    C2 = [1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396]
    C3 = [-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
          1.445305721320277, -0.5900435899266435]
    result = C0 * sh[0]
    if degree > 0:
        x, y, z = d[0], d[1], d[2]
        result = result - C1 * y * sh[1] + C1 * z * sh[2] - C1 * x * sh[3]
        if degree > 1:
            xx, yy, zz = x * x, y * y, z * z
            xy, yz, xz = x * y, y * z, x * z
            result = (result + C2[0] * xy * sh[4] + C2[1] * yz * sh[5] + C2[2] * (2.0 * zz - xx - yy) * sh[6]
                      + C2[3] * xz * sh[7] + C2[4] * (xx - yy) * sh[8])
            if degree > 2:
                result = (result + C3[0] * y * (3 * xx - yy) * sh[9] + C3[1] * xy * z * sh[10]
                          + C3[2] * y * (4 * zz - xx - yy) * sh[11] + C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * sh[12]
                          + C3[4] * x * (4 * zz - xx - yy) * sh[13] + C3[5] * z * (xx - yy) * sh[14]
                          + C3[6] * x * (xx - 3 * yy) * sh[15])
    return result


def view_colors_ref(colors, sh_rest, *, means, Fbar, viewmats, frame):
    """Per-camera colours [C, M, 3], one Gaussian and camera at a time: the view direction (camera centre -> mean)
    pulled back by Fbar^-1, turned by frame^T, normalised, then 3DGS's eval_sh on [dc; rest] + 0.5, clamped at 0
    (colors = C0 dc + 0.5, so dc = (colors - 0.5) / C0)."""
    C, M = viewmats.shape[0], means.shape[0]
    degree = {0: 0, 3: 1, 8: 2, 15: 3}[sh_rest.shape[1]]
    dc = (colors - 0.5) / 0.28209479177387814
    out = []
    for c in range(C):
        R, t = viewmats[c, :3, :3], viewmats[c, :3, 3]
        centre = -R.T @ t
        row = []
        for j in range(M):
            d = frame.T @ (_inverse3(Fbar[j]) @ (means[j] - centre))
            d = d / torch.linalg.norm(d)
            sh = torch.cat([dc[j][None], sh_rest[j]], dim=0)
            row.append(torch.clamp_min(eval_sh_ref(degree, sh, d) + 0.5, 0.0))
        out.append(torch.stack(row))
    return torch.stack(out)
