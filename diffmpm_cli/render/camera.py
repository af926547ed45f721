"""Cameras: pinhole intrinsics and world-to-camera poses in the OpenCV frame (x right, y down, z forward).

Pixel (i, j) has its centre at (j + 0.5, i + 0.5), as in gsplat. Computed in float64 numpy; ``CameraSet.to_torch``
hands them to the renderer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config.checks import camera_names
from ..errors import ConfigError
from .capture import read_capture

_EPS = 1e-9


@dataclass(frozen=True)
class CameraSet:
    """``names`` [C], ``viewmats`` [C, 4, 4] world->camera, ``Ks`` [C, 3, 3] in pixels, image size in pixels."""

    names: tuple[str, ...]
    viewmats: np.ndarray
    Ks: np.ndarray
    width: int
    height: int
    keys: tuple[str, ...] = ()  # key path of the config entry that made each camera (build_cameras), or none

    @property
    def camera_count(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def to_torch(self, device="cpu", dtype=None):
        import torch

        dtype = dtype or torch.float32
        return (torch.as_tensor(self.viewmats, dtype=dtype, device=device),
                torch.as_tensor(self.Ks, dtype=dtype, device=device))

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates [C, P, 2] and camera depths [C, P] of world points [P, 3]."""
        homo = np.concatenate([points, np.ones((len(points), 1))], axis=1)
        cam = np.einsum("cij,pj->cpi", self.viewmats, homo)[..., :3]
        depth = cam[..., 2]
        safe = np.where(np.abs(depth) < _EPS, _EPS, depth)
        uvw = np.einsum("cij,cpj->cpi", self.Ks, cam)
        return uvw[..., :2] / safe[..., None], depth


def intrinsics_from_fov(fov_deg: float, width: int, height: int) -> np.ndarray:
    """K for a vertical field of view [deg], square pixels and the principal point at the image centre."""
    focal = 0.5 * height / math.tan(math.radians(fov_deg) / 2.0)
    return np.array([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])


class DegenerateView(ValueError):
    """A pose that cannot be built. ``part``: "position" (eye and target coincide), "up" (zero) or "parallel" (up
    along the viewing direction), so that the message can name the key that fixes it."""

    def __init__(self, message: str, part: str):
        super().__init__(message)
        self.part = part


def look_at(eye, target, up) -> np.ndarray:
    """World-to-camera 4x4 for a camera at ``eye`` looking at ``target``; raises DegenerateView when degenerate."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    forward = target - eye
    if np.linalg.norm(forward) < _EPS:
        raise DegenerateView("eye and target coincide", "position")
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up)
    if np.linalg.norm(up) < _EPS:
        raise DegenerateView("up is zero", "up")
    if np.linalg.norm(right) < 1e-6 * np.linalg.norm(up):
        raise DegenerateView("up is parallel to the viewing direction", "parallel")
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rot = np.stack([right, down, forward])
    view = np.eye(4)
    view[:3, :3] = rot
    view[:3, 3] = -rot @ eye
    return view


def orbit_eye(*, target, up, azimuth_deg: float, elevation_deg: float, radius: float) -> np.ndarray:
    """Camera position on an orbit. Azimuth 0 lies on the side of the horizontal direction closest to +z."""
    up = np.asarray(up, dtype=np.float64)
    if not _EPS <= np.linalg.norm(up) < math.inf:
        raise DegenerateView("up is zero or too long (its length overflows)", "up")
    up = up / np.linalg.norm(up)
    ref = np.array([0.0, 0.0, 1.0]) if abs(up[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    ahead = ref - up * (ref @ up)
    ahead /= np.linalg.norm(ahead)
    side = np.cross(up, ahead)
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    direction = math.cos(el) * (math.cos(az) * ahead + math.sin(az) * side) + math.sin(el) * up
    return np.asarray(target, dtype=np.float64) + radius * direction


def _checked_viewmat(matrix, where: str) -> np.ndarray:
    view = np.asarray(matrix, dtype=np.float64)
    rot = view[:3, :3]
    if not np.allclose(view[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
        raise ConfigError(where, "last row must be [0, 0, 0, 1]")
    if not np.allclose(rot @ rot.T, np.eye(3), atol=1e-4) or np.linalg.det(rot) <= 0:
        raise ConfigError(where, "the upper-left 3x3 block must be a rotation (orthonormal, det +1)")
    return view


def similarity(matrix, key: str) -> tuple[float, np.ndarray, np.ndarray]:
    """(scale s, rotation R, translation t) of a 4x4 similarity [[s R, t], [0, 1]]; ConfigError naming ``key``."""
    m = np.asarray(matrix, dtype=np.float64)
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
        raise ConfigError(key, "last row must be [0, 0, 0, 1]")
    det = float(np.linalg.det(m[:3, :3]))
    if not det > 0 or not math.isfinite(det):
        raise ConfigError(key, "the upper-left 3x3 block must be a positive scale times a rotation (det > 0)")
    scale = det ** (1.0 / 3.0)
    rot = m[:3, :3] / scale
    if not np.allclose(rot @ rot.T, np.eye(3), atol=1e-4):
        raise ConfigError(key, "the upper-left 3x3 block must be a uniform scale times a rotation (no shear, no "
                               "unequal scales)")
    return scale, rot, m[:3, 3]


def capture_cameras(cam, *, where: str, size: tuple[int, int]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, K [3, 3] at ``size`` = (width, height), world -> camera [4, 4]) of a capture rig's cameras (its
    ``select`` ones, in the capture's order), in the scene's coordinates (``world_from_capture``)."""
    cameras = read_capture(cam.path, fmt=cam.format, key=f"{where}.path")
    if cam.select is not None:
        by_name = {c.name: c for c in cameras}
        for i, name in enumerate(cam.select):
            if name not in by_name:
                shown = ", ".join(list(by_name)[:8]) + (", ..." if len(by_name) > 8 else "")
                raise ConfigError(f"{where}.select[{i}]", f"the capture has no camera named '{name}' (it has {shown})")
        cameras = [by_name[name] for name in cam.select]
    scale, rot, shift = 1.0, np.eye(3), np.zeros(3)
    if cam.world_from_capture is not None:
        scale, rot, shift = similarity(cam.world_from_capture, f"{where}.world_from_capture")
    width, height = size
    out = []
    for c in cameras:
        if abs(width * c.height / c.width - height) > 1.0:  # the same picture at another size, within a pixel
            fitted = max(1, round(width * c.height / c.width))
            raise ConfigError("render.height", f"camera '{c.name}' of {where} takes {c.width}x{c.height} px pictures "
                                               f"(aspect {c.width / c.height:.4g}) but render is {width}x{height}: "
                                               f"give a render size of the same aspect, e.g. {width}x{fitted}")
        K = c.K.copy()
        K[0] *= width / c.width
        K[1] *= height / c.height
        view = np.eye(4)  # x_scene = s R x + t: the camera's axes turn by R^T, its distances scale by s
        view[:3, :3] = c.viewmat[:3, :3] @ rot.T
        view[:3, 3] = scale * c.viewmat[:3, 3] - view[:3, :3] @ shift
        out.append((cam.prefix + c.name, K, view))
    return out


def build_cameras(render, *, default_target) -> CameraSet:
    """All cameras of a ``RenderConfig``, in order; raises ConfigError naming ``render.cameras[i]...``."""
    views, Ks, names, keys = [], [], [], []
    size = (render.width, render.height)
    for index, cam in enumerate(render.cameras):
        where = f"render.cameras[{index}]"
        if cam.type == "capture":
            for name, K, view in capture_cameras(cam, where=where, size=size):
                names.append(name)
                Ks.append(K)
                views.append(view)
                keys.append(where)
            continue
        names += [f"{cam.name}{j}" for j in range(len(cam.azimuths))] if cam.type == "orbit" else [cam.name]
        keys += [where] * (len(cam.azimuths) if cam.type == "orbit" else 1)
        target = cam.target if cam.target is not None else default_target
        if cam.type == "orbit":
            K = intrinsics_from_fov(cam.fov, *size)
            for azimuth in cam.azimuths:
                try:
                    eye = orbit_eye(target=target, up=cam.up, azimuth_deg=azimuth, elevation_deg=cam.elevation,
                                    radius=cam.radius)
                    views.append(look_at(eye, target, cam.up))
                except DegenerateView as exc:  # name the key that fixes it (a radius lost in a huge target's rounding)
                    position = "radius" if cam.radius < 1e-6 or cam.target is None else "target"
                    key = {"position": position, "up": "up", "parallel": "elevation"}[exc.part]
                    raise ConfigError(f"{where}.{key}", str(exc)) from exc
                Ks.append(K)
            continue
        if (cam.fov is None) == (cam.K is None):
            raise ConfigError(where, "give exactly one of fov and K")
        if cam.K is not None:
            K = np.asarray(cam.K, dtype=np.float64)
            if K[0, 0] <= 0 or K[1, 1] <= 0 or not np.allclose(K[2], [0, 0, 1]) or K[1, 0] != 0 or K[0, 1] != 0:
                raise ConfigError(f"{where}.K", "must be [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0")
        else:
            K = intrinsics_from_fov(cam.fov, *size)
        if (cam.eye is None) == (cam.world_to_camera is None):
            raise ConfigError(where, "give exactly one of eye (with target, up) and world_to_camera")
        if cam.world_to_camera is not None:
            view = _checked_viewmat(cam.world_to_camera, f"{where}.world_to_camera")
        else:
            try:
                view = look_at(cam.eye, target, cam.up)
            except DegenerateView as exc:  # name the key that fixes it
                key = "up" if exc.part != "position" else "target" if cam.target is not None else "eye"
                raise ConfigError(f"{where}.{key}", str(exc)) from exc
        views.append(view)
        Ks.append(K)
    camera_names(render)  # refuses a name used twice among the orbit and pinhole cameras
    seen = set()
    for name, key in zip(names, keys):
        if name in seen:
            raise ConfigError(key, f"camera name '{name}' is used twice (a capture's prefix tells two captures apart)")
        seen.add(name)
    return CameraSet(names=tuple(names), viewmats=np.stack(views), Ks=np.stack(Ks), width=render.width,
                     height=render.height, keys=tuple(keys))


def check_view(cameras: CameraSet, render, point) -> None:
    """Every camera of ``render.cameras`` (built into ``cameras``) sees ``point`` (the domain's centre): in front of
    it between render.near and render.far, inside the image. ConfigError naming the camera's entry otherwise."""
    pixels, depths = cameras.project(np.asarray([point], dtype=np.float64))
    for c, name in enumerate(cameras.names):
        (u, v), depth = pixels[c, 0], depths[c, 0]
        where = cameras.keys[c] if cameras.keys else camera_location(c, render)
        if not render.near < depth < render.far:
            raise ConfigError(where, f"camera '{name}' does not look at the domain: its centre is at depth "
                                     f"{depth:.3g} m, outside near..far = {render.near:g}..{render.far:g} m"
                                     + _convention_hint(cameras, c, render, where, point))
        if not (0.0 <= u <= render.width and 0.0 <= v <= render.height):
            raise ConfigError(where, f"camera '{name}' does not look at the domain: its centre projects to pixel "
                                     f"({u:.1f}, {v:.1f}), outside the {render.width}x{render.height} image"
                                     + _convention_hint(cameras, c, render, where, point))


def _convention_hint(cameras: CameraSet, c: int, render, where: str, point) -> str:
    """What usually makes a given matrix miss the domain: an OpenGL camera-to-world matrix (Blender, nerfstudio)
    where OpenCV's world-to-camera is expected. Says so outright when that reading of the matrix sees ``point``."""
    cam = render.cameras[int(where.rsplit("[", 1)[1].rstrip("]"))]
    if cam.type == "capture":
        return "; check world_from_capture (it places the capture in the scene) and the capture's format"
    if cam.type != "pinhole" or cam.world_to_camera is None:
        return ""
    matrix = np.asarray(cam.world_to_camera, dtype=np.float64)
    opencv = np.linalg.inv(matrix @ np.diag([1.0, -1.0, -1.0, 1.0]))  # the matrix read as OpenGL camera-to-world
    inside = CameraSet(names=("x",), viewmats=opencv[None], Ks=cameras.Ks[c:c + 1], width=render.width,
                       height=render.height)
    (u, v), depth = (a[0, 0] for a in inside.project(np.asarray([point], dtype=np.float64)))
    seen = render.near < depth < render.far and 0 <= u <= render.width and 0 <= v <= render.height
    if seen:
        return ("; M looks like OpenGL's camera-to-world (Blender, nerfstudio), which sees it: world_to_camera is "
                "OpenCV's (x right, y down, z forward), so give inverse(M @ diag(1, -1, -1, 1))")
    return ("; world_to_camera is OpenCV's (x right, y down, z forward), not OpenGL's camera-to-world (Blender, "
            "nerfstudio; convert with inverse(M @ diag(1, -1, -1, 1)))")


def camera_location(index: int, render) -> str:
    """Key path of the config entry that made camera ``index`` of ``build_cameras``."""
    count = 0
    for i, cam in enumerate(render.cameras):
        count += len(cam.azimuths) if cam.type == "orbit" else 1
        if index < count:
            return f"render.cameras[{i}]"
    raise IndexError(index)


def rig_cameras(render, *, views: list[tuple[float, float | None]], default_target, width: int | None = None,
                height: int | None = None, name: str = "view") -> CameraSet:
    """Cameras at (azimuth, elevation) [deg] pairs around the target of the scene's first orbit rig, at its radius
    and fov (or 2 m, 30 deg, the domain centre when it has none); an elevation of None takes the rig's (or 20)."""
    rig = next((cam for cam in render.cameras if cam.type == "orbit"), None)
    rig_elevation, radius, fov = (rig.elevation, rig.radius, rig.fov) if rig else (20.0, 2.0, 30.0)
    target = rig.target if rig is not None and rig.target is not None else default_target
    up = rig.up if rig is not None else [0.0, 1.0, 0.0]
    width, height = width or render.width, height or render.height
    K = intrinsics_from_fov(fov, width, height)
    mats = [look_at(orbit_eye(target=target, up=up, azimuth_deg=azimuth,
                              elevation_deg=rig_elevation if elevation is None else elevation, radius=radius),
                    target, up) for azimuth, elevation in views]
    return CameraSet(names=tuple(f"{name}{i}" for i in range(len(views))), viewmats=np.stack(mats),
                     Ks=np.stack([K] * len(views)), width=width, height=height)


def turntable_cameras(render, *, count: int, default_target, width: int | None = None,
                      height: int | None = None) -> CameraSet:
    """``count`` cameras evenly around the vertical axis at the first orbit rig's elevation (``rig_cameras``)."""
    return rig_cameras(render, views=[(360.0 * i / count, None) for i in range(count)], default_target=default_target,
                       width=width, height=height, name="turntable")


# the views results are judged from: 8 azimuths at 15 deg elevation (4 of them between the usual training views),
# 4 at 50 deg that training rigs do not use
EVALUATION_VIEWS = [(45.0 * i, 15.0) for i in range(8)] + [(90.0 * i, 50.0) for i in range(4)]


def evaluation_cameras(render, *, default_target, size: int) -> CameraSet:
    """The 12 ``EVALUATION_VIEWS`` at size x size pixels, around the first orbit rig's target (``rig_cameras``)."""
    return rig_cameras(render, views=EVALUATION_VIEWS, default_target=default_target, width=size, height=size,
                       name="eval")
