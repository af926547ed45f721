"""Cameras of a real capture: COLMAP sparse models (text or binary), nerfstudio / Blender ``transforms.json`` and the
INRIA 3DGS ``cameras.json``, read into pinhole intrinsics and world-to-camera matrices in the OpenCV frame (x right,
y down, z forward), the frame the renderer uses.

Conventions of the three formats (each checked against files their own writers make, tests/test_captures.py):

* COLMAP: ``images.txt`` / ``images.bin`` hold ``cam_from_world`` as a quaternion (w, x, y, z) and a translation,
  already OpenCV; ``cameras.txt`` / ``cameras.bin`` hold the camera model and its parameters in pixels.
* transforms.json (nerfstudio, instant-ngp, Blender's NeRF exports): ``transform_matrix`` is camera-to-world in the
  OpenGL frame (x right, y up, z backward), so the camera's y and z axes are flipped; ``camera_angle_x`` is the
  *horizontal* field of view in radians; ``fl_x``/``fl_y``/``cx``/``cy``/``w``/``h`` in pixels where given (top
  level or per frame).
* INRIA cameras.json (written by the 3DGS trainer): per camera ``rotation`` (camera-to-world rotation, OpenCV),
  ``position`` (camera centre), ``fx``, ``fy``, ``width``, ``height``; principal point at the image centre.

Cameras with lens distortion are refused with the model named (the renderer is a pinhole camera): undistort the
images first (``colmap image_undistorter``, nerfstudio's ``ns-process-data``) and import the undistorted model.
Every refusal is a ConfigError naming the rig's key path.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError

MAX_CAPTURE_BYTES = 256 << 20  # a camera file larger than this is not a camera file
MAX_CAPTURE_CAMERAS = 100_000

# COLMAP camera models: id -> (name, parameter count, indices of fx, fy, cx, cy (fy = fx when repeated),
# indices of the distortion parameters)
COLMAP_MODELS = {
    0: ("SIMPLE_PINHOLE", 3, (0, 0, 1, 2), ()),
    1: ("PINHOLE", 4, (0, 1, 2, 3), ()),
    2: ("SIMPLE_RADIAL", 4, (0, 0, 1, 2), (3,)),
    3: ("RADIAL", 5, (0, 0, 1, 2), (3, 4)),
    4: ("OPENCV", 8, (0, 1, 2, 3), (4, 5, 6, 7)),
    5: ("OPENCV_FISHEYE", 8, (0, 1, 2, 3), (4, 5, 6, 7)),
    6: ("FULL_OPENCV", 12, (0, 1, 2, 3), tuple(range(4, 12))),
    7: ("FOV", 5, (0, 1, 2, 3), (4,)),
    8: ("SIMPLE_RADIAL_FISHEYE", 4, (0, 0, 1, 2), (3,)),
    9: ("RADIAL_FISHEYE", 5, (0, 0, 1, 2), (3, 4)),
    10: ("THIN_PRISM_FISHEYE", 12, (0, 1, 2, 3), tuple(range(4, 12))),
}
COLMAP_BY_NAME = {name: (model_id, *rest) for model_id, (name, *rest) in COLMAP_MODELS.items()}
FISHEYE = {"OPENCV_FISHEYE", "SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE", "THIN_PRISM_FISHEYE", "FOV"}

OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])  # flips a camera's y and z axes (both ways)


@dataclass(frozen=True)
class CaptureCamera:
    """One camera of a capture: ``name`` (its image's file name without folder or extension), ``K`` [3, 3] px at
    ``width`` x ``height`` (the capture's image size), ``viewmat`` [4, 4] world -> camera (OpenCV), ``image`` (the
    image path as the file names it, resolved against the capture's folder; it need not exist)."""

    name: str
    K: np.ndarray
    viewmat: np.ndarray
    width: int
    height: int
    image: str


def capture_format(path: Path) -> str:
    """'colmap' (a folder with cameras.txt/.bin and images.txt/.bin), 'transforms' (a transforms*.json with frames)
    or 'inria' (a JSON list of cameras), from the path alone; ValueError when it is none of these."""
    if path.is_dir():
        return "colmap"
    if path.suffix.lower() == ".json":
        return "inria" if _read_json(path, "")[0] == "list" else "transforms"
    raise ValueError("not a COLMAP model folder or a JSON camera file")


def read_capture(path, *, fmt: str = "auto", key: str) -> list[CaptureCamera]:
    """The cameras of a capture file or COLMAP folder, in the file's order (COLMAP: by image name).

    ``fmt``: 'auto', 'colmap', 'transforms' or 'inria'. Raises ConfigError naming ``key`` for a missing, malformed or
    distorted capture."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(key, f"capture not found: {path}")
    if fmt == "auto":
        try:
            fmt = capture_format(path)
        except ValueError as exc:
            raise ConfigError(key, f"{path}: {exc}") from None
    readers = {"colmap": _read_colmap, "transforms": _read_transforms, "inria": _read_inria}
    cameras = readers[fmt](path, key)
    if not cameras:
        raise ConfigError(key, f"{path} holds no camera")
    names = [c.name for c in cameras]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ConfigError(key, f"{path}: two images are named '{duplicate}' (camera names come from image file names "
                               "without folder and extension)")
    return cameras


# ----------------------------------------------------------------------------------------------------------------
# shared checks


def _intrinsics(fx, fy, cx, cy, width, height, where: str, key: str) -> np.ndarray:
    values = [fx, fy, cx, cy, width, height]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ConfigError(key, f"{where}: focal lengths, principal point and image size must be finite numbers")
    if fx <= 0 or fy <= 0 or width < 1 or height < 1 or int(width) != width or int(height) != height:
        raise ConfigError(key, f"{where}: needs focal lengths > 0 and a whole image size >= 1 px, got fx={fx:g}, "
                               f"fy={fy:g}, size {width:g}x{height:g}")
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=np.float64)


def _rotation_check(rot: np.ndarray, where: str, key: str, what: str) -> None:
    if not np.all(np.isfinite(rot)):
        raise ConfigError(key, f"{where}: {what} holds non-finite numbers")
    if not np.allclose(rot @ rot.T, np.eye(3), atol=1e-4):
        raise ConfigError(key, f"{where}: {what} is not a rotation (its rows are not orthonormal)")
    if np.linalg.det(rot) < 0:
        raise ConfigError(key, f"{where}: {what} is a reflection (det -1), not a rotation")


def _no_distortion(model: str, params: list[float], indices, where: str, key: str) -> None:
    coefficients = [params[i] for i in indices]
    if model in FISHEYE or any(abs(c) > 1e-12 for c in coefficients):
        shown = ", ".join(f"{c:g}" for c in coefficients)
        raise ConfigError(key, f"{where}: camera model {model} has lens distortion ({shown}); diffmpm renders pinhole "
                               "cameras only: undistort the images first (colmap image_undistorter, or nerfstudio's "
                               "ns-process-data) and import the undistorted PINHOLE model")


def quaternion_to_rotation(q) -> np.ndarray:
    """Rotation matrix [3, 3] of a quaternion (w, x, y, z), normalised first."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def _name(image: str) -> str:
    return Path(image.replace("\\", "/")).stem


def _read_bytes(path: Path, key: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_CAPTURE_BYTES:
            raise ConfigError(key, f"{path} is larger than {MAX_CAPTURE_BYTES >> 20} MiB: not a camera file")
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None


# ----------------------------------------------------------------------------------------------------------------
# COLMAP


def _read_colmap(folder: Path, key: str) -> list[CaptureCamera]:
    if not folder.is_dir():
        raise ConfigError(key, f"{folder}: a COLMAP model is a folder (sparse/0) with cameras and images files")
    if (folder / "cameras.bin").exists() and (folder / "images.bin").exists():
        cams, images = _colmap_cameras_bin(folder / "cameras.bin", key), _colmap_images_bin(folder / "images.bin", key)
    elif (folder / "cameras.txt").exists() and (folder / "images.txt").exists():
        cams, images = _colmap_cameras_txt(folder / "cameras.txt", key), _colmap_images_txt(folder / "images.txt", key)
    else:
        raise ConfigError(key, f"{folder} holds neither cameras.bin + images.bin nor cameras.txt + images.txt")
    out = []
    for image_id, qvec, tvec, camera_id, name in sorted(images, key=lambda item: item[4]):
        where = f"{folder.name}: image {image_id} ({name})"
        if camera_id not in cams:
            raise ConfigError(key, f"{where} refers to camera {camera_id}, which the cameras file does not hold")
        model, width, height, params = cams[camera_id]
        count, (ifx, ify, icx, icy), distortion = COLMAP_BY_NAME[model][1:]
        _no_distortion(model, params, distortion, f"{folder.name}: camera {camera_id}", key)
        K = _intrinsics(params[ifx], params[ify], params[icx], params[icy], width, height, where, key)
        if not np.all(np.isfinite(qvec)) or np.linalg.norm(qvec) < 1e-12 or not np.all(np.isfinite(tvec)):
            raise ConfigError(key, f"{where}: its pose is not a finite quaternion and translation")
        view = np.eye(4)
        view[:3, :3] = quaternion_to_rotation(qvec)
        view[:3, 3] = tvec
        out.append(CaptureCamera(_name(name), K, view, int(width), int(height), str(folder / name)))
    return out


def _colmap_camera(model: str, width, height, params: list[float], camera_id, where: str, key: str):
    if model not in COLMAP_BY_NAME:
        raise ConfigError(key, f"{where}: unknown COLMAP camera model {model!r}")
    count = COLMAP_BY_NAME[model][1]
    if len(params) != count:
        raise ConfigError(key, f"{where}: camera {camera_id} ({model}) needs {count} parameters, got {len(params)}")
    return camera_id, (model, width, height, params)


def _text_lines(path: Path, key: str) -> list[tuple[int, str]]:
    try:
        text = _read_bytes(path, key).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not UTF-8 text") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]


def _colmap_cameras_txt(path: Path, key: str) -> dict:
    cams = {}
    for number, line in _text_lines(path, key):
        if not line or line.startswith("#"):
            continue
        words = line.split()
        where = f"{path.name} line {number}"
        try:
            camera_id, model, width, height = int(words[0]), words[1], int(words[2]), int(words[3])
            params = [float(w) for w in words[4:]]
        except (ValueError, IndexError):
            raise ConfigError(key, f"{where}: expected CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]") from None
        camera_id, value = _colmap_camera(model, width, height, params, camera_id, where, key)
        cams[camera_id] = value
    return cams


def _colmap_images_txt(path: Path, key: str) -> list:
    images = []
    lines = [(n, line) for n, line in _text_lines(path, key) if not line.startswith("#")]
    # two lines per image: the pose line, then the (possibly empty) 2D points line
    index = 0
    while index < len(lines):
        number, line = lines[index]
        if not line:
            index += 1
            continue
        words = line.split(maxsplit=9)
        try:
            image_id = int(words[0])
            qvec = np.array([float(w) for w in words[1:5]])
            tvec = np.array([float(w) for w in words[5:8]])
            camera_id, name = int(words[8]), words[9]
        except (ValueError, IndexError):
            raise ConfigError(key, f"{path.name} line {number}: expected IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID "
                                   "NAME") from None
        images.append((image_id, qvec, tvec, camera_id, name))
        index += 2  # skip the points line
    return images


class _Reader:
    def __init__(self, data: bytes, path: Path, key: str):
        self.data, self.offset, self.path, self.key = data, 0, path, key

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.data):
            raise ConfigError(self.key, f"{self.path.name}: ends early at byte {self.offset} (truncated or not a "
                                        "COLMAP binary file)")
        values = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += size
        return values

    def name(self) -> str:
        end = self.data.find(b"\0", self.offset)
        if end < 0:
            raise ConfigError(self.key, f"{self.path.name}: an image name is not terminated")
        raw = self.data[self.offset:end]
        self.offset = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(self.key, f"{self.path.name}: an image name is not UTF-8") from None

    def skip(self, count: int, item: int) -> None:
        if count < 0 or self.offset + count * item > len(self.data):
            raise ConfigError(self.key, f"{self.path.name}: ends early (truncated or not a COLMAP binary file)")
        self.offset += count * item


def _count(reader: _Reader) -> int:
    (count,) = reader.take("<Q")
    if count > MAX_CAPTURE_CAMERAS:
        raise ConfigError(reader.key, f"{reader.path.name}: claims {count} entries (more than {MAX_CAPTURE_CAMERAS}):"
                                      " not a COLMAP binary file")
    return count


def _colmap_cameras_bin(path: Path, key: str) -> dict:
    reader = _Reader(_read_bytes(path, key), path, key)
    cams = {}
    for _ in range(_count(reader)):
        camera_id, model_id, width, height = reader.take("<iiQQ")
        if model_id not in COLMAP_MODELS:
            raise ConfigError(key, f"{path.name}: camera {camera_id} has unknown COLMAP model id {model_id}")
        model, count = COLMAP_MODELS[model_id][:2]
        params = list(reader.take(f"<{count}d"))
        camera_id, value = _colmap_camera(model, width, height, params, camera_id, path.name, key)
        cams[camera_id] = value
    return cams


def _colmap_images_bin(path: Path, key: str) -> list:
    reader = _Reader(_read_bytes(path, key), path, key)
    images = []
    for _ in range(_count(reader)):
        image_id, *pose, camera_id = reader.take("<i7di")
        name = reader.name()
        (points,) = reader.take("<Q")
        reader.skip(points, 24)  # x, y (double) and the 3D point id (int64) per observation
        images.append((image_id, np.array(pose[:4]), np.array(pose[4:]), camera_id, name))
    return images


# ----------------------------------------------------------------------------------------------------------------
# JSON formats


def _read_json(path: Path, key: str):
    try:
        data = json.loads(_read_bytes(path, key).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(key, f"{path} is not JSON: {exc}") from None
    return ("list" if isinstance(data, list) else "dict" if isinstance(data, dict) else "other"), data


def _number(entry: dict, name: str, where: str, key: str, default=None):
    value = entry.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(key, f"{where}: '{name}' must be a finite number, got {str(value)[:40]}")
    return float(value)


def _matrix(value, shape, where: str, key: str, name: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.shape != shape or not np.all(np.isfinite(array)):
        raise ConfigError(key, f"{where}: '{name}' must be a {shape[0]}x{shape[1]} matrix of finite numbers")
    return array


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of an image file from its header (nothing decoded), trying the usual extensions when the
    name has none (Blender's exports leave it out); None when no such image is found."""
    from PIL import Image

    candidates = [path] if path.suffix else [path.with_suffix(s) for s in (".png", ".jpg", ".jpeg", ".PNG", ".JPG")]
    for candidate in candidates:
        if candidate.is_file():
            try:
                with Image.open(candidate) as img:
                    return img.size
            except Exception:  # noqa: BLE001 - any Pillow failure means "no usable size from this file"
                return None
    return None


DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")


def _read_transforms(path: Path, key: str) -> list[CaptureCamera]:
    kind, data = _read_json(path, key)
    if kind != "dict" or not isinstance(data.get("frames"), list):
        raise ConfigError(key, f"{path}: a transforms.json is an object with a 'frames' list")
    folder = path.parent
    out = []
    for index, frame in enumerate(data["frames"]):
        where = f"{path.name}: frames[{index}]"
        if not isinstance(frame, dict) or not isinstance(frame.get("file_path"), str):
            raise ConfigError(key, f"{where}: needs 'file_path' and 'transform_matrix'")
        merged = {**data, **frame}  # per-frame intrinsics override the shared ones (nerfstudio)
        model = merged.get("camera_model", "OPENCV")
        if model not in ("OPENCV", "PINHOLE"):
            raise ConfigError(key, f"{where}: camera model {model} has lens distortion; diffmpm renders pinhole "
                                   "cameras only: undistort the images first (nerfstudio's ns-process-data)")
        coefficients = [_number(merged, k, where, key, 0.0) for k in DISTORTION_KEYS]
        if any(abs(c) > 1e-12 for c in coefficients):
            shown = ", ".join(f"{k}={c:g}" for k, c in zip(DISTORTION_KEYS, coefficients) if c)
            raise ConfigError(key, f"{where}: camera model {model} has lens distortion ({shown}); diffmpm renders "
                                   "pinhole cameras only: undistort the images first (nerfstudio's ns-process-data)")
        image = folder / frame["file_path"]
        width, height = _number(merged, "w", where, key), _number(merged, "h", where, key)
        if width is None or height is None:
            size = _image_size(image)
            if size is None:
                raise ConfigError(key, f"{where}: gives no image size ('w', 'h') and its image {image} cannot be "
                                       "read for one")
            width, height = size
        fx, fy = _number(merged, "fl_x", where, key), _number(merged, "fl_y", where, key)
        angle_x, angle_y = _number(merged, "camera_angle_x", where, key), _number(merged, "camera_angle_y", where, key)
        if fx is None and angle_x is not None:  # the horizontal field of view, in radians
            if not 0 < angle_x < math.pi:
                raise ConfigError(key, f"{where}: camera_angle_x must be in (0, pi) radians, got {angle_x:g}")
            fx = 0.5 * width / math.tan(0.5 * angle_x)
        if fy is None and angle_y is not None:
            if not 0 < angle_y < math.pi:
                raise ConfigError(key, f"{where}: camera_angle_y must be in (0, pi) radians, got {angle_y:g}")
            fy = 0.5 * height / math.tan(0.5 * angle_y)
        if fx is None and fy is None:
            raise ConfigError(key, f"{where}: gives no focal length (fl_x / fl_y or camera_angle_x)")
        fx, fy = fx if fx is not None else fy, fy if fy is not None else fx  # square pixels when one is given
        cx = _number(merged, "cx", where, key, width / 2.0)
        cy = _number(merged, "cy", where, key, height / 2.0)
        K = _intrinsics(fx, fy, cx, cy, width, height, where, key)
        c2w = _matrix(frame.get("transform_matrix"), (4, 4), where, key, "transform_matrix")
        if not np.allclose(c2w[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
            raise ConfigError(key, f"{where}: transform_matrix's last row must be [0, 0, 0, 1]")
        rot = c2w[:3, :3]
        scales = np.linalg.norm(rot, axis=0)
        if np.all(scales > 0) and np.allclose(scales, scales[0], rtol=1e-4):
            rot = rot / scales[0]  # instant-ngp's exports may carry a uniform scale in the rotation block
        _rotation_check(rot, where, key, "transform_matrix's rotation block (camera-to-world, OpenGL)")
        c2w_gl = np.eye(4)
        c2w_gl[:3, :3], c2w_gl[:3, 3] = rot, c2w[:3, 3]
        view = np.linalg.inv(c2w_gl @ OPENGL_TO_OPENCV)  # OpenGL camera (y up, z back) -> OpenCV (y down, z forward)
        out.append(CaptureCamera(_name(frame["file_path"]), K, view, int(width), int(height), str(image)))
    return out


def _read_inria(path: Path, key: str) -> list[CaptureCamera]:
    kind, data = _read_json(path, key)
    if kind != "list":
        raise ConfigError(key, f"{path}: an INRIA cameras.json is a list of cameras")
    out = []
    for index, entry in enumerate(data):
        where = f"{path.name}: [{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("img_name"), str):
            raise ConfigError(key, f"{where}: needs img_name, width, height, position, rotation, fx, fy")
        numbers = [_number(entry, n, where, key) for n in ("fx", "fy", "width", "height")]
        if any(v is None for v in numbers):
            raise ConfigError(key, f"{where}: needs fx, fy, width and height")
        fx, fy, width, height = numbers
        K = _intrinsics(fx, fy, width / 2.0, height / 2.0, width, height, where, key)
        rot = _matrix(entry.get("rotation"), (3, 3), where, key, "rotation")
        position = _vector(entry.get("position"), where, key)
        _rotation_check(rot, where, key, "rotation (camera-to-world)")
        view = np.eye(4)
        view[:3, :3] = rot.T
        view[:3, 3] = -rot.T @ position
        out.append(CaptureCamera(_name(entry["img_name"]), K, view, int(width), int(height),
                                 str(path.parent / entry["img_name"])))
    return out


def _vector(value, where: str, key: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.shape != (3,) or not np.all(np.isfinite(array)):
        raise ConfigError(key, f"{where}: 'position' must be 3 finite numbers")
    return array


# ----------------------------------------------------------------------------------------------------------------
# writing (diffmpm's own outputs)


def inria_camera_entries(*, names, viewmats, Ks, width: int, height: int, up_matrix=None) -> list[dict]:
    """INRIA cameras.json entries of cameras (viewmats [C, 4, 4] world -> camera, OpenCV; Ks [C, 3, 3]), as the
    3DGS trainer writes them (id, img_name, width, height, position, rotation = camera-to-world rotation, fx, fy).
    ``up_matrix`` [3, 3]: the rotation applied to the exported world (output.up_axis), applied here too."""
    up = np.eye(3) if up_matrix is None else np.asarray(up_matrix, dtype=np.float64)
    entries = []
    for index, (name, view, K) in enumerate(zip(names, np.asarray(viewmats, np.float64), np.asarray(Ks, np.float64))):
        rot_c2w = view[:3, :3].T
        centre = -rot_c2w @ view[:3, 3]
        entries.append({"id": index, "img_name": str(name), "width": int(width), "height": int(height),
                        "position": (up @ centre).tolist(), "rotation": (up @ rot_c2w).tolist(),
                        "fx": float(K[0, 0]), "fy": float(K[1, 1])})
    return entries
