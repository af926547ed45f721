"""Evaluation metrics for reconstructions: silhouettes, point clouds, occupancy, images and material parameters,
and the physical validity of a particle state (inverted deformation gradients, particles piled into few cells).

These are reporting metrics, not losses: every function runs under ``torch.no_grad()``, accepts float tensors on any
device (CPU or CUDA, float32 or float64; second arguments are moved to the first argument's device) and returns
plain Python floats (or lists of floats, one per camera view). Lengths are in the units of the inputs (metres in
this project); images are expected in [0, 1]. Silhouette masks may be boolean or 0/1 tensors as well as alphas (for
example the exact target-mesh silhouettes of ``render.mesh_raster.mesh_silhouettes``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "bbox_diagonal",
    "chamfer_distance",
    "clumping",
    "deformation_validity",
    "material_errors",
    "psnr",
    "silhouette_iou",
    "volumetric_iou",
]


def _as_views(x: torch.Tensor, name: str) -> torch.Tensor:
    """[C,H,W,1] or [C,H,W] -> [C,H,W]."""
    if x.dim() == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape [C,H,W,1] or [C,H,W], got {tuple(x.shape)}")
    return x


def _as_points(x: torch.Tensor, name: str) -> torch.Tensor:
    """[..., 3] -> [N, 3], floating point."""
    if x.dim() < 1 or x.shape[-1] != 3:
        raise ValueError(f"{name} must have shape [N,3], got {tuple(x.shape)}")
    x = x.detach().reshape(-1, 3)
    if not x.is_floating_point():
        x = x.to(torch.float32)
    return x


@torch.no_grad()
def silhouette_iou(alphas: torch.Tensor, target_alphas: torch.Tensor, threshold: float = 0.5) -> list[float]:
    """Per-view intersection over union of binarised silhouettes.

    Args:
        alphas: rendered opacities, [C,H,W,1] or [C,H,W], values in [0, 1].
        target_alphas: reference opacities of the same shape ([C,H,W,1] and [C,H,W] mix freely); a boolean mask
            (True = covered) or a 0/1 float mask works too, e.g. ``mesh_silhouettes`` of the exact target mesh.
        threshold: a pixel belongs to a mask when its alpha is strictly greater than this.

    Returns:
        C floats in [0, 1]: |A ∩ B| / |A ∪ B| for each view; a view where both masks are empty counts 1.0.
    """
    a = _as_views(alphas.detach(), "alphas")
    b = _as_views(target_alphas.detach(), "target_alphas").to(a.device)
    if a.shape != b.shape:
        raise ValueError(f"alphas {tuple(a.shape)} and target_alphas {tuple(b.shape)} differ in shape")
    ma = a > threshold
    mb = b > threshold
    inter = (ma & mb).flatten(1).sum(dim=1)
    union = (ma | mb).flatten(1).sum(dim=1)
    out = []
    for i, u in zip(inter.tolist(), union.tolist()):
        out.append(1.0 if u == 0 else i / u)
    return out


@torch.no_grad()
def chamfer_distance(points: torch.Tensor, target_points: torch.Tensor, *, normalize_by: float | None = None) -> float:
    """Symmetric Chamfer distance between two point clouds, with Euclidean (not squared) distances.

        CD = 0.5 * (mean_{p in P} min_{q in Q} |p - q| + mean_{q in Q} min_{p in P} |p - q|)

    Nearest neighbours are exact, in float64. On the CPU by k-d trees (scipy): O((N + M) log(N + M)) where the clouds
    lie close. A k-d tree degrades where one cloud lies far inside the other (a sphere starting a morph inside its
    target: many surface points are nearly equidistant to each query, and the search visits them all): 120k points
    against a 480k-point surface took 17.5 s per call on the H100 host and 33 s here. CUDA tensors are compared by
    brute force on the GPU instead (``nearest_distances``: float64, cost independent of the geometry).

    Args:
        points: [N,3] (any [...,3] is flattened), same length unit as ``target_points``.
        target_points: [M,3].
        normalize_by: when given, the result is divided by it (e.g. ``bbox_diagonal(target_points)``), making it
            dimensionless.

    Returns:
        The Chamfer distance in input length units (or relative to ``normalize_by``).
    """
    p = _as_points(points, "points").detach()
    q = _as_points(target_points, "target_points").detach().to(p.device)
    if p.shape[0] == 0 or q.shape[0] == 0:
        raise ValueError("chamfer_distance needs non-empty point sets")
    if p.is_cuda:
        p_mean = float(nearest_distances(p, q).mean())
        q_mean = float(nearest_distances(q, p).mean())
    else:
        from scipy.spatial import cKDTree

        p64, q64 = p.cpu().double().numpy(), q.cpu().double().numpy()
        p_mean = float(cKDTree(q64).query(p64, k=1)[0].mean())
        q_mean = float(cKDTree(p64).query(q64, k=1)[0].mean())
    cd = 0.5 * (p_mean + q_mean)
    if normalize_by is not None:
        cd /= float(normalize_by)
    return cd


@torch.no_grad()
def nearest_distances(points: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """[N] float64: each point's Euclidean distance to its nearest neighbour among ``others`` [M, 3], by brute force
    in float64 on the points' device (``kernels/nearest.py``: one thread per point, no distance matrix). On the
    H100 the torch version it replaces (chunks of an N x M float64 matrix, |a|^2 + |b|^2 - 2 a.b) took ~25 ms per
    direction for the snowman's clouds, bound by writing and reading the matrix."""
    from .warp_runtime import torch_stream, warp, warp_device

    wp = warp()
    from .kernels import nearest

    a = points.reshape(-1, 3).double().contiguous()
    b = others.reshape(-1, 3).to(a.device).double().contiguous()
    out = torch.empty(a.shape[0], dtype=torch.float64, device=a.device)
    if a.shape[0] == 0:
        return out
    if b.shape[0] == 0:
        raise ValueError("nearest_distances needs at least one other point")
    with torch_stream(a.device):
        wp.launch(nearest.nearest_distance, dim=a.shape[0], device=warp_device(a.device),
                  inputs=[wp.from_torch(a, dtype=wp.vec3d), wp.from_torch(b, dtype=wp.vec3d)],
                  outputs=[wp.from_torch(out, dtype=wp.float64)])
    return out


@torch.no_grad()
def bbox_diagonal(points: torch.Tensor) -> float:
    """Length of the diagonal of the axis-aligned bounding box of ``points`` [N,3], in input length units."""
    p = _as_points(points, "points")
    if p.shape[0] == 0:
        raise ValueError("bbox_diagonal needs at least one point")
    extent = p.max(dim=0).values.double() - p.min(dim=0).values.double()
    return float(torch.linalg.vector_norm(extent).item())


def _grid(lower, dx, shape, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Checked grid description: lower corner [3] and cell edges [3] (float64), shape [3] (long), cell count."""
    dims = [int(s) for s in shape]
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"shape must be three positive ints, got {tuple(shape)}")
    lo = torch.as_tensor(lower, dtype=torch.float64, device=device).reshape(-1).expand(3)
    h = torch.as_tensor(dx, dtype=torch.float64, device=device).reshape(-1).expand(3)
    if bool((h <= 0).any()):
        raise ValueError(f"dx must be positive, got {dx}")
    shp = torch.tensor(dims, dtype=torch.long, device=device)
    return lo, h, shp, dims[0] * dims[1] * dims[2]


def _cell_ids(x: torch.Tensor, lower: torch.Tensor, dx: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Flat cell index [N] of each point: floor((x - lower) / dx), clamped into the grid per axis."""
    ijk = torch.floor((x.double() - lower) / dx).long()
    ijk = torch.minimum(torch.clamp(ijk, min=0), shape - 1)
    return (ijk[:, 0] * shape[1] + ijk[:, 1]) * shape[2] + ijk[:, 2]


def _occupancy(x: torch.Tensor, lower: torch.Tensor, dx: torch.Tensor, shape: torch.Tensor, cells: int) -> torch.Tensor:
    """Flat boolean occupancy grid of ``cells`` entries; a cell is occupied when at least one point falls in it."""
    occ = torch.zeros(cells, dtype=torch.bool, device=x.device)
    if x.shape[0] == 0:
        return occ
    occ[_cell_ids(x, lower, dx, shape)] = True
    return occ


@torch.no_grad()
def volumetric_iou(positions: torch.Tensor, target_positions: torch.Tensor, *,
                   lower: Sequence[float] | torch.Tensor, dx: float | Sequence[float] | torch.Tensor,
                   shape: Sequence[int]) -> float:
    """Intersection over union of the voxel occupancy of two particle sets.

    Both sets are binned into the same grid of ``shape`` = (nx, ny, nz) cells of edge ``dx`` (a scalar, or one
    per axis) whose lowest corner is ``lower`` (3 floats). A point x lands in cell floor((x - lower) / dx),
    clamped into [0, shape - 1] per axis, so points outside the grid count in its border cells. A cell is
    occupied when at least one particle lands in it.

    Args:
        positions: [N,3] particle positions (same units as ``lower`` and ``dx``).
        target_positions: [M,3] reference particle positions.

    Returns:
        |occ(P) ∩ occ(Q)| / |occ(P) ∪ occ(Q)| in [0, 1]; 1.0 when both grids are empty.
    """
    p = _as_points(positions, "positions")
    q = _as_points(target_positions, "target_positions").to(p.device)
    lo, h, shp, cells = _grid(lower, dx, shape, p.device)
    occ_p = _occupancy(p, lo, h, shp, cells)
    occ_q = _occupancy(q, lo, h, shp, cells)
    union = int((occ_p | occ_q).sum().item())
    if union == 0:
        return 1.0
    return int((occ_p & occ_q).sum().item()) / union


@torch.no_grad()
def psnr(images: torch.Tensor, target_images: torch.Tensor, mask: torch.Tensor | None = None) -> list[float]:
    """Per-view peak signal-to-noise ratio in dB, for images with values in [0, 1] (peak 1).

        PSNR = 10 log10(1 / MSE) = -10 log10(MSE)

    Args:
        images: [C,H,W,3] rendered images.
        target_images: [C,H,W,3] reference images.
        mask: optional [C,H,W,1] or [C,H,W]; when given, the MSE of a view is averaged over its pixels with
            mask > 0.5 only (all colour channels of those pixels).

    Returns:
        C floats: ``inf`` for a view whose MSE is 0, ``nan`` for a view whose mask selects no pixel.
    """
    x = images.detach()
    y = target_images.detach().to(x.device)
    if x.dim() != 4 or x.shape != y.shape:
        raise ValueError(f"images {tuple(x.shape)} and target_images {tuple(y.shape)} must both be [C,H,W,3]")
    sq = (x.double() - y.double()).square()  # [C,H,W,K]
    if mask is None:
        mse = sq.flatten(1).mean(dim=1).tolist()
    else:
        m = _as_views(mask.detach(), "mask").to(x.device)
        if m.shape != x.shape[:3]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match images {tuple(x.shape)}")
        sel = (m > 0.5).unsqueeze(-1).double()  # [C,H,W,1]
        count = (sel.flatten(1).sum(dim=1) * x.shape[-1]).tolist()
        total = (sq * sel).flatten(1).sum(dim=1).tolist()
        mse = [t / c if c > 0 else math.nan for t, c in zip(total, count)]
    out = []
    for e in mse:
        if math.isnan(e):
            out.append(math.nan)
        elif e <= 0.0:
            out.append(math.inf)
        else:
            out.append(-10.0 * math.log10(e))
    return out


@torch.no_grad()
def deformation_validity(F: torch.Tensor, Jp: torch.Tensor | None = None) -> dict[str, float]:
    """Inversion statistics of deformation gradients: J = det F (computed in float64) of every particle.

    A physical state has J > 0 everywhere (J <= 0 means a particle turned inside out or collapsed to zero volume).

    Args:
        F: [N,3,3] deformation gradients (any [...,3,3] is flattened; dimensionless).
        Jp: [N] plastic volume ratios J_P = det F_P of a model that stores only the elastic part F_E in F (snow):
            J = det F_E J_P, the volume ratio of the whole deformation gradient F = F_E F_P. Snow's clamp keeps
            det F_E within [(1 - theta_c)^3, (1 + theta_s)^3] > 0, even for an inverted F (its negative singular
            value is clamped up to 1 - theta_c), so compaction and inversion show only in J_P.

    Returns:
        ``inverted_share``: fraction of particles with J <= 0; ``nonfinite_share``: fraction whose J is NaN or
        infinite (counted in neither the share nor the statistics below); ``det_F_min``, ``det_F_median`` (the
        mean of the two middle values for even counts), ``det_F_max`` over the finite J (NaN when none is).
    """
    f = F.detach()
    if f.dim() < 2 or f.shape[-2:] != (3, 3):
        raise ValueError(f"F must have shape [N,3,3], got {tuple(F.shape)}")
    f = f.reshape(-1, 3, 3)
    if f.shape[0] == 0:
        raise ValueError("deformation_validity needs at least one particle")
    J = torch.linalg.det(f.to(torch.float64))
    if Jp is not None:
        if Jp.numel() != J.numel():
            raise ValueError(f"Jp must hold one value per deformation gradient ({J.numel()}), got {Jp.numel()}")
        J = J * Jp.detach().reshape(-1).to(device=J.device, dtype=torch.float64)
    finite = torch.isfinite(J)
    n = J.shape[0]
    Jf = J[finite].sort().values
    m = Jf.shape[0]
    if m == 0:
        low = mid = high = math.nan
    else:
        low, high = float(Jf[0].item()), float(Jf[-1].item())
        mid = float(Jf[m // 2].item()) if m % 2 else 0.5 * float(Jf[m // 2 - 1].item() + Jf[m // 2].item())
    return {
        "inverted_share": int((Jf <= 0).sum().item()) / n,
        "nonfinite_share": (n - m) / n,
        "det_F_min": low,
        "det_F_median": mid,
        "det_F_max": high,
    }


@torch.no_grad()
def clumping(positions: torch.Tensor, *, lower: Sequence[float] | torch.Tensor,
             dx: float | Sequence[float] | torch.Tensor, shape: Sequence[int], rest_count: float,
             factor: float = 4.0) -> dict[str, float | int]:
    """How much of the body is piled into few grid cells (mass clumping, an unphysical collapse).

    Particles are binned exactly as in ``volumetric_iou``: cell floor((x - lower) / dx) of a ``shape`` grid,
    clamped per axis, so particles outside the grid count in its border cells.

    Args:
        positions: [N,3] particle positions (same units as ``lower`` and ``dx``, metres in this project).
        lower: lowest grid corner, 3 floats. dx: cell edge, a scalar or one per axis. shape: (nx, ny, nz).
        rest_count: particles per cell in the rest state (e.g. 8 for 2 x 2 x 2 particles per cell); positive.
        factor: a cell is clumped when it holds strictly more than ``factor * rest_count`` particles.

    Returns:
        ``clumped_share``: fraction of all particles that sit in clumped cells; ``max_per_cell`` (int): the most
        particles in one cell; ``max_per_cell_ratio``: max_per_cell / rest_count.
    """
    p = _as_points(positions, "positions")
    if p.shape[0] == 0:
        raise ValueError("clumping needs at least one particle")
    rest = float(rest_count)
    if not rest > 0:
        raise ValueError(f"rest_count must be positive, got {rest_count}")
    lo, h, shp, cells = _grid(lower, dx, shape, p.device)
    ids = _cell_ids(p, lo, h, shp)
    counts = torch.bincount(ids, minlength=cells)
    clumped = counts[ids] > float(factor) * rest
    peak = int(counts.max().item())
    return {
        "clumped_share": int(clumped.sum().item()) / p.shape[0],
        "max_per_cell": peak,
        "max_per_cell_ratio": peak / rest,
    }


def _scalar(v: float | torch.Tensor) -> float:
    return float(v.detach().reshape(()).item()) if isinstance(v, torch.Tensor) else float(v)


@torch.no_grad()
def material_errors(*, E: float | torch.Tensor | None = None, nu: float | torch.Tensor | None = None,
                    truth_E: float | torch.Tensor | None = None,
                    truth_nu: float | torch.Tensor | None = None) -> dict[str, float]:
    """Errors of recovered material parameters against the ground truth.

    Args:
        E, truth_E: estimated and true Young's modulus (Pa; any consistent unit); truth_E must be non-zero.
        nu, truth_nu: estimated and true Poisson ratio (dimensionless).
        Scalars may be Python numbers or one-element tensors.

    Returns:
        ``{"E_rel_error": |E - E*| / |E*|, "nu_abs_error": |nu - nu*|}``, each key present only when both its
        estimate and its truth are given (so possibly an empty dict).
    """
    out: dict[str, float] = {}
    if E is not None and truth_E is not None:
        e, te = _scalar(E), _scalar(truth_E)
        if te == 0.0:
            raise ValueError("truth_E must be non-zero for a relative error")
        out["E_rel_error"] = abs(e - te) / abs(te)
    if nu is not None and truth_nu is not None:
        out["nu_abs_error"] = abs(_scalar(nu) - _scalar(truth_nu))
    return out
