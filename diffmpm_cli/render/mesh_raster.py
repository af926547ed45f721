"""Exact silhouettes of triangle meshes: the independent yardstick that morph results are judged by (issue #11).

Same camera conventions as the Gaussian rasteriser (gsplat's): world->camera ``viewmats`` in the OpenCV frame
(x right, y down, z forward), pinhole ``Ks``, pixel (row i, column j) centred at (u, v) = (j + 0.5, i + 0.5).
A pixel is covered when its centre lies inside (or on the boundary of) a projected triangle. Reporting code only:
no gradients, pure torch (any device), float64 throughout.

Method: every triangle of every view gets its pixel bounding box; the pixels of all boxes are enumerated in
chunks of ``RASTER_CHUNK`` (as ``assets/lattice.py`` enumerates lattice columns) and tested against the three
edge functions, and the hits are scattered into the mask.

No cracks: an edge shared by two triangles has one edge function, computed from its two projected end points in
a canonical order (lower vertex index first), so both triangles evaluate bit-identical values at a pixel centre.
Each triangle keeps the side of that line where its third vertex lies, inclusively (value >= 0 after an exact
sign flip), so a centre on a shared edge between triangles on opposite sides is counted by at least one of them
whatever the rounding.
"""

from __future__ import annotations

import numpy as np
import torch

RASTER_CHUNK = 1 << 18  # (triangle, pixel) tests per vectorised batch
NEAR = 1e-3  # m: triangles with a vertex at camera depth z <= near are dropped
_BOX_SLACK = 1e-7  # px: bounding boxes grow by this much so no rounding loses a centre on an edge

__all__ = ["NEAR", "RASTER_CHUNK", "mesh_silhouettes"]


def _tensor(x, dtype: torch.dtype, device: torch.device, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=dtype)
    if isinstance(x, np.ndarray) or isinstance(x, (list, tuple)):
        return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def _project(vertices: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates [C, V, 2] and camera depths [C, V] (coordinates of vertices at z <= 0 are meaningless)."""
    cam = torch.einsum("cij,vj->cvi", viewmats[:, :3, :3], vertices) + viewmats[:, None, :3, 3]
    depth = cam[..., 2]
    uvw = torch.einsum("cij,cvj->cvi", Ks, cam)
    safe = torch.where(depth > 0, depth, torch.ones_like(depth))
    return uvw[..., :2] / safe[..., None], depth


def _edge_planes(uv: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """[C, F, 3, 3] coefficients (a, b, c) of the three edge functions a u + b v + c of every projected triangle,
    signed so that the triangle's interior is where all three are >= 0; rows of degenerate triangles are NaN."""
    planes = []
    for k in range(3):
        i0, i1, i2 = faces[:, k], faces[:, (k + 1) % 3], faces[:, (k + 2) % 3]
        lo, hi = torch.minimum(i0, i1), torch.maximum(i0, i1)  # canonical order: one value per mesh edge
        p, q = uv[:, lo], uv[:, hi]  # [C, F, 2]
        a = p[..., 1] - q[..., 1]
        b = q[..., 0] - p[..., 0]
        c = -(a * p[..., 0] + b * p[..., 1])
        r = uv[:, i2]
        side = torch.sign(a * r[..., 0] + b * r[..., 1] + c)  # which side the third vertex lies on
        side = torch.where(side == 0, torch.full_like(side, float("nan")), side)
        planes.append(torch.stack([a * side, b * side, c * side], dim=-1))  # exact sign flips
    return torch.stack(planes, dim=2)


@torch.no_grad()
def mesh_silhouettes(vertices, faces, viewmats, Ks, width: int, height: int, *, near: float = NEAR,
                     device=None) -> torch.Tensor:
    """Exact silhouettes (pixel coverage) of a triangle mesh seen by C pinhole cameras.

    Args:
        vertices: [V, 3] vertex positions (m), numpy or torch; computed in float64.
        faces: [F, 3] vertex indices (either winding, need not be consistent).
        viewmats: [C, 4, 4] world->camera matrices, OpenCV frame (as ``CameraSet.viewmats`` or ``to_torch()``).
        Ks: [C, 3, 3] pinhole intrinsics in pixels.
        width, height: image size in pixels.
        near: triangles with any vertex at camera depth z <= near (m) are dropped, not clipped.
        device: where to compute; default the device of the first torch tensor among the inputs, else the CPU.

    Returns:
        Bool tensor [C, height, width]: True where the pixel centre (j + 0.5, i + 0.5) lies inside or on the
        boundary of at least one projected triangle.
    """
    if device is None:
        device = next((x.device for x in (vertices, faces, viewmats, Ks) if isinstance(x, torch.Tensor)), "cpu")
    device = torch.device(device)
    v = _tensor(vertices, torch.float64, device, "vertices")
    f = _tensor(faces, torch.long, device, "faces")
    views = _tensor(viewmats, torch.float64, device, "viewmats")
    K = _tensor(Ks, torch.float64, device, "Ks")
    if v.dim() != 2 or v.shape[1] != 3:
        raise ValueError(f"vertices must have shape [V,3], got {tuple(v.shape)}")
    if f.dim() != 2 or f.shape[1] != 3:
        raise ValueError(f"faces must have shape [F,3], got {tuple(f.shape)}")
    if views.dim() != 3 or views.shape[1:] != (4, 4):
        raise ValueError(f"viewmats must have shape [C,4,4], got {tuple(views.shape)}")
    if K.shape != (views.shape[0], 3, 3):
        raise ValueError(f"Ks must have shape [C,3,3] with C = {views.shape[0]}, got {tuple(K.shape)}")
    width, height = int(width), int(height)
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be positive, got {width} x {height}")
    if f.numel() and (int(f.min()) < 0 or int(f.max()) >= v.shape[0]):
        raise ValueError(f"faces index vertices outside [0, {v.shape[0]})")
    cameras = views.shape[0]
    mask = torch.zeros(cameras * height * width, dtype=torch.bool, device=device)
    if f.shape[0] == 0 or cameras == 0:
        return mask.reshape(cameras, height, width)

    uv, depth = _project(v, views, K)
    planes = _edge_planes(uv, f)  # [C, F, 3, 3]
    tri_uv = uv[:, f]  # [C, F, 3, 2]
    keep = (depth[:, f] > near).all(dim=2) & ~planes.isnan().flatten(2).any(dim=2)  # [C, F]
    cam_id, face_id = keep.nonzero(as_tuple=True)
    if cam_id.numel() == 0:
        return mask.reshape(cameras, height, width)
    tri_uv, planes = tri_uv[cam_id, face_id], planes[cam_id, face_id].reshape(-1, 9)  # [T, 3, 2], [T, 9]

    # pixel bounding boxes: centres j + 0.5 in [u_min, u_max], clipped to the image
    lo = tri_uv.min(dim=1).values - 0.5 - _BOX_SLACK
    hi = tri_uv.max(dim=1).values - 0.5 + _BOX_SLACK
    limit = torch.tensor([width, height], dtype=torch.float64, device=device)
    first = torch.minimum(torch.ceil(lo).clamp(min=0.0), limit).long()  # [T, 2] (column, row)
    last = torch.minimum(torch.floor(hi).clamp(min=-1.0), limit - 1).long()
    span = (last - first + 1).clamp(min=0)
    counts = span[:, 0] * span[:, 1]
    ends = torch.cumsum(counts, 0)
    total = int(ends[-1])
    starts = ends - counts
    base = cam_id * (height * width)

    for s in range(0, total, RASTER_CHUNK):
        idx = torch.arange(s, min(s + RASTER_CHUNK, total), device=device)
        tri = torch.searchsorted(ends, idx, right=True)
        local = idx - starts[tri]
        nx = span[tri, 0]
        col = first[tri, 0] + local % nx
        row = first[tri, 1] + local // nx
        u = col.to(torch.float64) + 0.5
        w = row.to(torch.float64) + 0.5
        pl = planes[tri]  # [n, 9]
        inside = (pl[:, 0] * u + pl[:, 1] * w + pl[:, 2]) >= 0
        inside &= (pl[:, 3] * u + pl[:, 4] * w + pl[:, 5]) >= 0
        inside &= (pl[:, 6] * u + pl[:, 7] * w + pl[:, 8]) >= 0
        pixel = base[tri] + row * width + col
        mask[pixel[inside]] = True
    return mask.reshape(cameras, height, width)
