"""Exact mesh silhouettes: analytic cases, no cracks, and agreement with trimesh ray casting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh
from scipy import ndimage

from diffmpm_cli.config.schema import RenderConfig
from diffmpm_cli.render import mesh_raster
from diffmpm_cli.render.camera import build_cameras, intrinsics_from_fov, look_at, orbit_eye
from diffmpm_cli.render.mesh_raster import mesh_silhouettes

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                  reason="needs CUDA")])]


def _pinhole(f: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]]])


def _plane_at(uv: np.ndarray, K: np.ndarray, z: float) -> np.ndarray:
    """World points (identity camera) at depth z that project to pixel coordinates uv [P, 2]."""
    f, cx, cy = K[0, 0, 0], K[0, 0, 2], K[0, 1, 2]
    return np.stack([(uv[:, 0] - cx) * z / f, (uv[:, 1] - cy) * z / f, np.full(len(uv), z)], axis=1)


def _orbit(count: int, size: int, *, elevation: float, radius: float = 2.0, fov: float = 30.0):
    target, up = [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    views = [look_at(orbit_eye(target=target, up=up, azimuth_deg=360.0 * i / count + 7.0, elevation_deg=elevation,
                               radius=radius), target, up) for i in range(count)]
    return np.stack(views), np.stack([intrinsics_from_fov(fov, size, size)] * count)


# ---------------------------------------------------------------- analytic cases


@pytest.mark.parametrize("flip", [False, True])
def test_square_covers_exact_pixel_block(flip):
    K = _pinhole(100.0, 32.0, 32.0)
    corners = np.array([[10.2, 5.3], [30.7, 5.3], [30.7, 20.1], [10.2, 20.1]])  # u, v in pixels
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    if flip:
        faces = faces[:, ::-1].copy()  # either winding
    mask = mesh_silhouettes(_plane_at(corners, K, 3.0), faces, np.eye(4)[None], K, 64, 48)
    expected = torch.zeros(1, 48, 64, dtype=torch.bool)
    expected[0, 5:20, 10:31] = True  # centres 10.5..30.5 and 5.5..19.5 lie inside
    assert mask.dtype == torch.bool and mask.shape == (1, 48, 64)
    assert torch.equal(mask, expected)


def test_square_edges_on_pixel_centres_are_inclusive():
    # corners and the shared diagonal pass exactly through pixel centres (every value exact in binary)
    K = _pinhole(64.0, 32.0, 32.0)
    corners = np.array([[10.5, 5.5], [30.5, 5.5], [30.5, 25.5], [10.5, 25.5]])
    for faces in (np.array([[0, 1, 2], [0, 2, 3]]), np.array([[0, 1, 3], [1, 2, 3]])):
        mask = mesh_silhouettes(_plane_at(corners, K, 2.0), faces, np.eye(4)[None], K, 40, 40)
        expected = torch.zeros(1, 40, 40, dtype=torch.bool)
        expected[0, 5:26, 10:31] = True
        assert torch.equal(mask, expected)


def test_sphere_silhouette_area_matches_disc():
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.3)
    distance, f, size = 2.0, 300.0, 160
    view = np.eye(4)
    view[2, 3] = distance  # sphere centre on the optical axis
    K = _pinhole(f, size / 2, size / 2)
    mask = mesh_silhouettes(sphere.vertices, sphere.faces, view[None], K, size, size)
    r_px = f * 0.3 / math.sqrt(distance**2 - 0.3**2)  # the tangent cone's image: a disc
    assert mask.sum().item() == pytest.approx(math.pi * r_px**2, rel=0.01)
    # and the disc is where it should be: centre pixel in, corners out
    assert mask[0, size // 2, size // 2] and not mask[0, 0, 0] and not mask[0, -1, -1]


# ---------------------------------------------------------------- no cracks


def test_fine_icosphere_has_no_holes():
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.35)
    views, Ks = _orbit(6, 96, elevation=33.0)
    mask = mesh_silhouettes(sphere.vertices, sphere.faces, views, Ks, 96, 96).numpy()
    for view in mask:
        assert view.sum() > 1000
        assert np.array_equal(ndimage.binary_fill_holes(view), view)


@pytest.mark.parametrize("eye", [[-1.549, -0.146, 1.83], [-1.544, -0.897, 2.168], [-0.208, 2.214, 2.078],
                                 [2.287, 0.238, 2.882], [-0.844, 0.406, 2.861]])
def test_grid_mesh_edges_through_pixel_centres_leave_no_cracks(eye):
    """A planar grid mesh built so that every edge (rows, columns and both diagonals) projects onto a line through
    pixel centres, seen by a generic camera: its projected vertices are half-integers only up to rounding, so
    many centres sit within rounding of shared edges. Every interior pixel must be covered. (An edge function
    evaluated per triangle in its own vertex order, instead of once per edge, leaves a pixel out in these views.)"""
    size, n, step, origin = 64, 24, 2.0, 3.5
    view = look_at(eye, [0.01, 0.02, 0.0], [0.0, 1.0, 0.0])
    K = intrinsics_from_fov(40.0, size, size)
    g = origin + step * np.arange(n + 1)
    uu, vv = np.meshgrid(g, g, indexing="xy")
    pixels = np.stack([uu.ravel(), vv.ravel(), np.ones(uu.size)], axis=1)
    rot, centre = view[:3, :3], -view[:3, :3].T @ view[:3, 3]
    rays = np.linalg.solve(K, pixels.T).T @ rot
    normal = np.array([0.3, 0.5, 1.0])
    vertices = centre + (-(centre @ normal) / (rays @ normal))[:, None] * rays  # on the plane through the origin
    faces = []
    for r in range(n):
        for c in range(n):
            a, b, d, e = r * (n + 1) + c, r * (n + 1) + c + 1, (r + 1) * (n + 1) + c, (r + 1) * (n + 1) + c + 1
            faces += [[a, b, e], [a, e, d]] if (r + c) % 2 else [[a, b, d], [b, e, d]]
    mask = mesh_silhouettes(vertices, np.array(faces), view[None], K[None], size, size)[0]
    # the grid spans centres 3.5 .. 51.5, i.e. pixels 3..51: everything strictly inside is covered
    assert int((~mask[4:51, 4:51]).sum()) == 0
    assert not bool(mask[:3].any()) and not bool(mask[53:].any())


# ---------------------------------------------------------------- an independent method


def _ray_cast(mesh: trimesh.Trimesh, view: np.ndarray, K: np.ndarray, width: int, height: int) -> np.ndarray:
    """Coverage by casting a ray from the camera centre through every pixel centre (trimesh + rtree)."""
    rot, t = view[:3, :3], view[:3, 3]
    jj, ii = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5, indexing="xy")
    pix = np.stack([jj.ravel(), ii.ravel(), np.ones(jj.size)], axis=1)
    directions = (np.linalg.solve(K, pix.T).T) @ rot  # camera -> world: R^T d
    origins = np.broadcast_to(-rot.T @ t, directions.shape)
    return mesh.ray.intersects_any(origins, directions).reshape(height, width)


def _distance_to_edges(mesh: trimesh.Trimesh, view: np.ndarray, K: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance (px) from each pixel-space point [P, 2] to the nearest projected mesh edge."""
    cam = mesh.vertices @ view[:3, :3].T + view[:3, 3]
    uv = (cam @ K.T)[:, :2] / cam[:, 2:3]
    edges = mesh.edges_unique
    a, b = uv[edges[:, 0]], uv[edges[:, 1]]
    ab = b - a
    t = np.clip(((points[:, None] - a) * ab).sum(-1) / (ab * ab).sum(-1), 0.0, 1.0)
    return np.linalg.norm(points[:, None] - (a + t[..., None] * ab), axis=-1).min(axis=1)


def test_torus_matches_trimesh_ray_casting():
    torus = trimesh.creation.torus(major_radius=0.3, minor_radius=0.12, major_sections=48, minor_sections=24)
    torus.apply_transform(trimesh.transformations.rotation_matrix(0.4, [1.0, 0.2, 0.0]))
    views, Ks = _orbit(3, 64, elevation=30.0)
    mask = mesh_silhouettes(torus.vertices, torus.faces, views, Ks, 64, 64).numpy()
    for c in range(len(views)):
        ref = _ray_cast(torus, views[c], Ks[c], 64, 64)
        assert 300 < ref.sum() < 64 * 64 - 300  # a real, non-convex silhouette (the hole shows at 30 deg)
        assert not np.array_equal(ndimage.binary_fill_holes(ref), ref)
        differ = np.argwhere(mask[c] != ref)
        assert len(differ) <= 3, f"view {c}: {len(differ)} pixels differ"
        if len(differ):
            centres = differ[:, ::-1] + 0.5  # (row, col) -> (u, v)
            assert _distance_to_edges(torus, views[c], Ks[c], centres).max() < 1e-6


# ---------------------------------------------------------------- inputs, cameras, devices


def test_takes_build_cameras_output_numpy_or_torch():
    render = RenderConfig.model_validate({
        "width": 48, "height": 40,
        "cameras": [{"type": "orbit", "azimuths": [0, 90, 200], "elevation": 20, "radius": 2.0, "fov": 30}],
    })
    cams = build_cameras(render, default_target=[0.0, 0.0, 0.0])
    box = trimesh.creation.box(extents=[0.4, 0.3, 0.2])
    from_numpy = mesh_silhouettes(box.vertices, box.faces, cams.viewmats, cams.Ks, cams.width, cams.height)
    views, Ks = cams.to_torch(dtype=torch.float64)
    from_torch = mesh_silhouettes(torch.as_tensor(box.vertices), torch.as_tensor(box.faces), views, Ks, 48, 40)
    assert from_numpy.shape == (3, 40, 48)
    assert torch.equal(from_numpy, from_torch)
    assert all(int(v.sum()) > 50 for v in from_numpy)
    views32, Ks32 = cams.to_torch()  # float32 tensors are accepted (computed in float64)
    assert mesh_silhouettes(box.vertices, box.faces, views32, Ks32, 48, 40).shape == (3, 40, 48)


def test_chunking_does_not_change_the_result(monkeypatch):
    torus = trimesh.creation.torus(major_radius=0.3, minor_radius=0.1)
    views, Ks = _orbit(4, 64, elevation=30.0)
    full = mesh_silhouettes(torus.vertices, torus.faces, views, Ks, 64, 64)
    monkeypatch.setattr(mesh_raster, "RASTER_CHUNK", 997)
    assert torch.equal(mesh_silhouettes(torus.vertices, torus.faces, views, Ks, 64, 64), full)


def test_near_plane_drops_triangles_and_offscreen_is_empty():
    K = _pinhole(50.0, 16.0, 16.0)
    corners = np.array([[4.0, 4.0], [28.0, 4.0], [28.0, 28.0], [4.0, 28.0]])
    verts = _plane_at(corners, K, 1.0)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    assert mesh_silhouettes(verts, faces, np.eye(4)[None], K, 32, 32).sum() > 0
    behind = verts.copy()
    behind[0, 2] = 1e-4  # one vertex of both triangles in front of the near plane: both dropped
    assert mesh_silhouettes(behind, faces, np.eye(4)[None], K, 32, 32).sum() == 0
    shifted = verts + np.array([5.0, 0.0, 0.0])  # entirely off to the right of the image
    assert mesh_silhouettes(shifted, faces, np.eye(4)[None], K, 32, 32).sum() == 0
    assert mesh_silhouettes(verts, np.zeros((0, 3), dtype=np.int64), np.eye(4)[None], K, 32, 32).shape == (1, 32, 32)


def test_rejects_bad_shapes():
    verts, faces = np.zeros((3, 3)), np.array([[0, 1, 2]])
    K = _pinhole(50.0, 16.0, 16.0)
    with pytest.raises(ValueError):
        mesh_silhouettes(verts[:, :2], faces, np.eye(4)[None], K, 32, 32)
    with pytest.raises(ValueError):
        mesh_silhouettes(verts, faces, np.eye(4), K, 32, 32)
    with pytest.raises(ValueError):
        mesh_silhouettes(verts, faces, np.eye(4)[None].repeat(2, 0), K, 32, 32)
    with pytest.raises(ValueError):
        mesh_silhouettes(verts, np.array([[0, 1, 3]]), np.eye(4)[None], K, 32, 32)


@pytest.mark.parametrize("device", DEVICES)
def test_device_follows_inputs(device):
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    views, Ks = _orbit(2, 48, elevation=10.0)
    cpu = mesh_silhouettes(sphere.vertices, sphere.faces, views, Ks, 48, 48)
    out = mesh_silhouettes(torch.as_tensor(sphere.vertices, device=device), sphere.faces, views, Ks, 48, 48)
    assert out.device.type == device
    assert torch.equal(out.cpu(), cpu)
