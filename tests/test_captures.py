"""Bring your own capture (issue #15): cameras from COLMAP / transforms.json / INRIA cameras.json, pictures of any
size with masks or a keyed background, and the files a splat user opens.

Camera files come from independent writers where one exists (pycolmap writes the COLMAP models; the INRIA entries
are made by a copy of the 3DGS trainer's camera_to_JSON) or are small hand-made fixtures whose numbers are checked
by hand (a transforms.json in the nerfstudio convention).
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import yaml
from conftest import BASE_SCENE
from PIL import Image
from typer.testing import CliRunner

from diffmpm_cli.cli import app
from diffmpm_cli.config import load_scene
from diffmpm_cli.errors import AssetError, ConfigError
from diffmpm_cli.render.camera import build_cameras, look_at
from diffmpm_cli.render.capture import OPENGL_TO_OPENCV, read_capture

runner = CliRunner()
CENTER = np.array([0.5, 0.5, 0.5])
EYES = [(0.5, 0.6, 2.0), (2.0, 0.7, 0.5), (0.4, 1.9, 0.9)]
CAPTURE_SIZE = (640, 480)  # the capture's pictures; renders are smaller with the same aspect


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def refused(result, key: str, fragment: str | None = None) -> str:
    """The one error line of a refused command (exit 2, no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr, repr(result.exception))
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    if fragment is not None:
        assert fragment in lines[0], lines[0]
    return lines[0]


def true_cameras():
    """(viewmats [3, 4, 4] OpenCV world -> camera, K [3, 3] at CAPTURE_SIZE) of the test capture."""
    views = np.stack([look_at(eye, CENTER, [0.0, 1.0, 0.0]) for eye in EYES])
    K = np.array([[520.0, 0.0, 321.5], [0.0, 515.0, 238.25], [0.0, 0.0, 1.0]])
    return views, K


def rotation_to_quaternion(R: np.ndarray) -> np.ndarray:
    """(w, x, y, z) of a rotation matrix (the textbook formula, for a well-conditioned trace)."""
    w = math.sqrt(max(0.0, 1.0 + R[0, 0] + R[1, 1] + R[2, 2])) / 2.0
    if w > 1e-3:
        return np.array([w, (R[2, 1] - R[1, 2]) / (4 * w), (R[0, 2] - R[2, 0]) / (4 * w), (R[1, 0] - R[0, 1]) / (4 * w)])
    x = math.sqrt(max(0.0, 1.0 + R[0, 0] - R[1, 1] - R[2, 2])) / 2.0
    return np.array([(R[2, 1] - R[1, 2]) / (4 * x), x, (R[0, 1] + R[1, 0]) / (4 * x), (R[0, 2] + R[2, 0]) / (4 * x)])


def write_colmap_with_pycolmap(folder, *, binary: bool, model: str = "PINHOLE", extra=()):
    """The test capture as a COLMAP sparse model written by pycolmap (the maintained COLMAP bindings)."""
    pycolmap = pytest.importorskip("pycolmap")
    views, K = true_cameras()
    rec = pycolmap.Reconstruction()
    params = {"PINHOLE": [K[0, 0], K[1, 1], K[0, 2], K[1, 2]],
              "SIMPLE_RADIAL": [K[0, 0], K[0, 2], K[1, 2], *extra],
              "OPENCV": [K[0, 0], K[1, 1], K[0, 2], K[1, 2], *extra]}[model]
    cam = pycolmap.Camera.create_from_model_name(1, model, 1.0, *CAPTURE_SIZE)
    cam.params = params
    rec.add_camera_with_trivial_rig(cam)
    for i, view in enumerate(views):
        q = rotation_to_quaternion(view[:3, :3])
        pose = pycolmap.Rigid3d(pycolmap.Rotation3d(np.array([q[1], q[2], q[3], q[0]])), view[:3, 3])  # xyzw
        image = pycolmap.Image(name=f"images/view_{i}.jpg", camera_id=1, image_id=i + 1)
        rec.add_image_with_trivial_frame(image, pose)
    for i in range(len(views)):  # what pycolmap itself holds is the truth the files must give back
        np.testing.assert_allclose(rec.image(i + 1).cam_from_world().matrix(), views[i][:3], atol=1e-12)
    folder.mkdir(parents=True, exist_ok=True)
    (rec.write_binary if binary else rec.write_text)(str(folder))
    return folder


def inria_camera_to_json(index, name, width, height, qvec, tvec, fx, fy):
    """The 3DGS trainer's utils/camera_utils.camera_to_JSON for a COLMAP camera (scene/dataset_readers.py stores
    R = qvec2rotmat(qvec).T and T = tvec; getWorld2View2 builds Rt with R.transpose() and T)."""
    R = rotation_matrix(qvec).T
    Rt = np.zeros((4, 4))
    Rt[:3, :3] = R.transpose()
    Rt[:3, 3] = tvec
    Rt[3, 3] = 1.0
    W2C = Rt
    pos = np.linalg.inv(W2C)[:3, 3]
    rot = np.linalg.inv(W2C)[:3, :3]
    return {"id": index, "img_name": name, "width": width, "height": height, "position": pos.tolist(),
            "rotation": [x.tolist() for x in rot], "fy": fy, "fx": fx}


def rotation_matrix(q):
    """qvec2rotmat of the 3DGS / COLMAP scripts (w, x, y, z)."""
    return np.array([
        [1 - 2 * q[2] ** 2 - 2 * q[3] ** 2, 2 * q[1] * q[2] - 2 * q[0] * q[3], 2 * q[3] * q[1] + 2 * q[0] * q[2]],
        [2 * q[1] * q[2] + 2 * q[0] * q[3], 1 - 2 * q[1] ** 2 - 2 * q[3] ** 2, 2 * q[2] * q[3] - 2 * q[0] * q[1]],
        [2 * q[3] * q[1] - 2 * q[0] * q[2], 2 * q[2] * q[3] + 2 * q[0] * q[1], 1 - 2 * q[1] ** 2 - 2 * q[2] ** 2]])


def write_transforms(path, *, views, K, size, angle_x: bool = False, extra=None):
    """A nerfstudio transforms.json: camera-to-world in OpenGL (camera y up, z backward), intrinsics in pixels."""
    frames = []
    for i, view in enumerate(views):
        c2w_opencv = np.linalg.inv(view)
        frames.append({"file_path": f"images/view_{i}.png", "transform_matrix": (c2w_opencv @ OPENGL_TO_OPENCV).tolist()})
    data = {"w": size[0], "h": size[1], "cx": K[0, 2], "cy": K[1, 2], "frames": frames, **(extra or {})}
    if angle_x:
        data["camera_angle_x"] = 2 * math.atan(0.5 * size[0] / K[0, 0])
    else:
        data.update(fl_x=K[0, 0], fl_y=K[1, 1])
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------------------------------------------------------
# camera files


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_colmap_models_written_by_pycolmap_load_to_the_true_cameras(tmp_path, binary):
    folder = write_colmap_with_pycolmap(tmp_path / "sparse" / "0", binary=binary)
    cameras = read_capture(folder, key="k")
    views, K = true_cameras()
    assert [c.name for c in cameras] == ["view_0", "view_1", "view_2"]
    for cam, view in zip(cameras, views):
        np.testing.assert_allclose(cam.viewmat, view, atol=1e-12)
        np.testing.assert_allclose(cam.K, K, atol=1e-12)
        assert (cam.width, cam.height) == CAPTURE_SIZE
        assert cam.image.endswith("images/view_0.jpg") or cam.image.endswith(f"images/{cam.name}.jpg")


def test_hand_made_colmap_text_model_has_the_numbers_worked_out_by_hand(tmp_path):
    # identity rotation, t = (0, 0, 5): the camera sits at (0, 0, -5) looking along +z, y down
    (tmp_path / "cameras.txt").write_text("# a comment\n1 SIMPLE_PINHOLE 100 80 50 50 40\n")
    (tmp_path / "images.txt").write_text("# IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME\n"
                                         "7 1 0 0 0 0 0 5 1 a b.png\n\n")
    (cam,) = read_capture(tmp_path, key="k")
    assert cam.name == "a b" and (cam.width, cam.height) == (100, 80)
    np.testing.assert_array_equal(cam.K, [[50, 0, 50], [0, 50, 40], [0, 0, 1]])
    # the origin lands at the principal point; +x (1 m) right by f / 5 = 10 px; +y down by 10 px
    for point, pixel in [((0, 0, 0), (50, 40)), ((1, 0, 0), (60, 40)), ((0, 1, 0), (50, 50))]:
        cam_point = cam.viewmat[:3, :3] @ point + cam.viewmat[:3, 3]
        uv = (cam.K @ cam_point)[:2] / cam_point[2]
        np.testing.assert_allclose(uv, pixel)


def test_transforms_json_in_the_nerfstudio_convention_is_converted_from_opengl(tmp_path):
    # by hand: an OpenGL camera at (0, 0, 5) with identity rotation looks down -z at the origin, its y is world up
    data = {"fl_x": 100.0, "fl_y": 100.0, "cx": 100.0, "cy": 50.0, "w": 200, "h": 100,
            "frames": [{"file_path": "./images/frame_00001.jpg",
                        "transform_matrix": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 5], [0, 0, 0, 1]]}]}
    path = tmp_path / "transforms.json"
    path.write_text(json.dumps(data))
    (cam,) = read_capture(path, key="k")
    assert cam.name == "frame_00001"

    def pixel(point):
        p = cam.viewmat[:3, :3] @ point + cam.viewmat[:3, 3]
        return (cam.K @ p)[:2] / p[2], p[2]

    (uv, depth) = pixel((0, 0, 0))
    np.testing.assert_allclose(uv, (100, 50))
    assert depth == pytest.approx(5.0)  # in front: OpenCV looks along +z
    np.testing.assert_allclose(pixel((1, 0, 0))[0], (120, 50))  # world +x is to the right
    np.testing.assert_allclose(pixel((0, 1, 0))[0], (100, 30))  # world +y (OpenGL up) is up in the picture


def test_camera_angle_x_is_the_horizontal_field_of_view(tmp_path):
    # Blender's export: camera_angle_x only, no w/h (read from the picture, whose name has no extension), no cx/cy
    (tmp_path / "r").mkdir()
    Image.new("RGB", (200, 100)).save(tmp_path / "r" / "0.png")
    data = {"camera_angle_x": math.pi / 2,
            "frames": [{"file_path": "./r/0", "transform_matrix": np.eye(4).tolist()}]}
    (tmp_path / "transforms_train.json").write_text(json.dumps(data))
    (cam,) = read_capture(tmp_path / "transforms_train.json", key="k")
    # 90 deg across 200 px: fx = 100 / tan(45 deg) = 100 (a vertical reading would give 50)
    np.testing.assert_allclose(cam.K, [[100, 0, 100], [0, 100, 50], [0, 0, 1]])
    assert (cam.width, cam.height) == (200, 100)


def test_colmap_transforms_and_inria_files_of_one_capture_load_to_the_same_cameras(tmp_path):
    pytest.importorskip("pycolmap")
    views, K = true_cameras()
    colmap = read_capture(write_colmap_with_pycolmap(tmp_path / "sparse", binary=True), key="k")
    transforms = read_capture(write_transforms(tmp_path / "transforms.json", views=views, K=K, size=CAPTURE_SIZE),
                              key="k")
    entries = [inria_camera_to_json(i, f"view_{i}", *CAPTURE_SIZE, rotation_to_quaternion(v[:3, :3]), v[:3, 3],
                                    K[0, 0], K[1, 1]) for i, v in enumerate(views)]
    (tmp_path / "cameras.json").write_text(json.dumps(entries))
    inria = read_capture(tmp_path / "cameras.json", key="k")
    for a, b, c in zip(colmap, transforms, inria):
        assert a.name == b.name == c.name
        np.testing.assert_allclose(b.viewmat, a.viewmat, atol=1e-9)
        np.testing.assert_allclose(c.viewmat, a.viewmat, atol=1e-9)
        np.testing.assert_allclose(b.K, a.K, atol=1e-9)
    # INRIA's file keeps no principal point: the image centre
    np.testing.assert_allclose(inria[0].K, [[K[0, 0], 0, 320], [0, K[1, 1], 240], [0, 0, 1]])


def test_distorted_cameras_are_refused_naming_the_model(tmp_path):
    pytest.importorskip("pycolmap")
    folder = write_colmap_with_pycolmap(tmp_path / "a", binary=False, model="OPENCV", extra=(0.1, 0.0, 0.0, 0.0))
    with pytest.raises(ConfigError, match="camera model OPENCV has lens distortion.*undistort"):
        read_capture(folder, key="k")
    # a radial model whose coefficient is zero is a pinhole camera
    folder = write_colmap_with_pycolmap(tmp_path / "b", binary=True, model="SIMPLE_RADIAL", extra=(0.0,))
    assert len(read_capture(folder, key="k")) == 3
    views, K = true_cameras()
    path = write_transforms(tmp_path / "t.json", views=views, K=K, size=CAPTURE_SIZE, extra={"k1": -0.05})
    with pytest.raises(ConfigError, match="OPENCV has lens distortion \\(k1=-0.05\\)"):
        read_capture(path, key="k")


@pytest.mark.parametrize("damage", ["truncated", "bad_model", "missing_camera"])
def test_damaged_colmap_models_are_one_error(tmp_path, damage):
    folder = write_colmap_with_pycolmap(tmp_path / "m", binary=damage != "bad_model")
    if damage == "truncated":
        data = (folder / "images.bin").read_bytes()
        (folder / "images.bin").write_bytes(data[: len(data) // 2])
    elif damage == "bad_model":
        (folder / "cameras.txt").write_text("1 WEIRD 640 480 1 2 3\n")
    else:
        (folder / "cameras.bin").write_bytes((0).to_bytes(8, "little"))
    with pytest.raises(ConfigError) as info:
        read_capture(folder, key="render.cameras[0].path")
    assert info.value.paths == ["render.cameras[0].path"]


# ---------------------------------------------------------------------------------------------------------------
# captures in a scene


def capture_scene(tmp_path, rig: dict, **render) -> dict:
    data = copy.deepcopy(BASE_SCENE)
    data["render"] = {"width": 64, "height": 48, "cameras": [{"type": "capture", **rig}], **render}
    return data


def write(tmp_path, data, name="scene.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_capture_rig_scales_intrinsics_to_the_render_size_and_selects_cameras(tmp_path):
    write_colmap_with_pycolmap(tmp_path / "sparse", binary=False)
    scene = load_scene(write(tmp_path, capture_scene(tmp_path, {"path": "sparse", "select": ["view_2", "view_0"],
                                                                "prefix": "cap/"})))
    cams = build_cameras(scene.render, default_target=CENTER)
    views, K = true_cameras()
    assert cams.names == ("cap/view_2", "cap/view_0") and (cams.width, cams.height) == (64, 48)
    scaled = K.copy()
    scaled[:2] *= 0.1  # 640x480 -> 64x48
    np.testing.assert_allclose(cams.Ks[0], scaled)
    np.testing.assert_allclose(cams.viewmats, views[[2, 0]], atol=1e-12)


def test_world_from_capture_places_the_capture_in_the_scene(tmp_path):
    write_colmap_with_pycolmap(tmp_path / "sparse", binary=True)
    angle = math.radians(30)
    R = np.array([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]])
    M = np.eye(4)
    M[:3, :3], M[:3, 3] = 0.5 * R, [0.1, -0.2, 0.3]
    plain = build_cameras(load_scene(write(tmp_path, capture_scene(tmp_path, {"path": "sparse"}))).render,
                          default_target=CENTER)
    moved = build_cameras(load_scene(write(tmp_path, capture_scene(
        tmp_path, {"path": "sparse", "world_from_capture": M.tolist()}))).render, default_target=CENTER)
    points = np.random.default_rng(0).uniform(-1, 1, size=(20, 3)) + CENTER
    uv, depth = plain.project(points)
    uv_moved, depth_moved = moved.project(points @ (0.5 * R).T + M[:3, 3])
    np.testing.assert_allclose(uv_moved, uv, atol=1e-9)  # the same pictures
    np.testing.assert_allclose(depth_moved, 0.5 * depth, atol=1e-12)  # at the scene's scale


def test_capture_scene_refusals_are_one_line_naming_the_key(tmp_path):
    write_colmap_with_pycolmap(tmp_path / "sparse", binary=False)
    refused(invoke("validate", write(tmp_path, capture_scene(tmp_path, {"path": "sparse"}, width=64, height=64))),
            "render.height", "give a render size of the same aspect, e.g. 64x48")
    refused(invoke("validate", write(tmp_path, capture_scene(tmp_path, {"path": "sparse", "select": ["nope"]}))),
            "render.cameras[0].select[0]", "no camera named 'nope'")
    refused(invoke("validate", write(tmp_path, capture_scene(tmp_path, {"path": "missing"}))),
            "render.cameras[0].path", "not found")
    shear = np.eye(4)
    shear[0, 1] = 0.5
    refused(invoke("validate", write(tmp_path, capture_scene(tmp_path, {"path": "sparse",
                                                                        "world_from_capture": shear.tolist()}))),
            "render.cameras[0].world_from_capture", "uniform scale times a rotation")
    data = capture_scene(tmp_path, {"path": "sparse"})
    data["target"]["images"] = [{"path": "pic.png", "camera": "view_9"}]
    Image.new("RGB", (64, 48)).save(tmp_path / "pic.png")
    refused(invoke("validate", write(tmp_path, data)), "target.images[0].camera", "no camera named 'view_9'")
    assert invoke("validate", write(tmp_path, capture_scene(tmp_path, {"path": "sparse"}))).exit_code == 0


def test_a_pasted_opengl_matrix_is_refused_with_the_opengl_opencv_hint(tmp_path):
    data = copy.deepcopy(BASE_SCENE)
    c2w_gl = np.linalg.inv(look_at((0.5, 0.6, 2.0), CENTER, [0, 1, 0])) @ OPENGL_TO_OPENCV  # Blender's matrix_world
    data["render"]["cameras"][1] = {"type": "pinhole", "name": "front", "fov": 35, "world_to_camera": c2w_gl.tolist()}
    line = refused(invoke("validate", write(tmp_path, data)), "render.cameras[1]")
    assert "OpenGL" in line and "OpenCV" in line and "diag(1, -1, -1, 1)" in line
    fixed = np.linalg.inv(np.array(c2w_gl) @ OPENGL_TO_OPENCV)  # what the message says to do
    data["render"]["cameras"][1]["world_to_camera"] = fixed.tolist()
    assert invoke("validate", write(tmp_path, data)).exit_code == 0


# ---------------------------------------------------------------------------------------------------------------
# pictures of any size, masks, keyed backgrounds


def disc_picture(size, *, center, radius, color=(200, 60, 30), background=(255, 255, 255)):
    """A uint8 RGB picture [H, W, 3] of a disc (the object) on a plain background, and its exact mask."""
    width, height = size
    jj, ii = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    inside = (jj - center[0]) ** 2 + (ii - center[1]) ** 2 < radius**2
    rgb = np.where(inside[..., None], np.array(color, np.uint8), np.array(background, np.uint8))
    return rgb.astype(np.uint8), inside


def test_a_phone_sized_jpeg_with_a_mask_downscales_to_the_render(tmp_path):
    from diffmpm_cli.assets.images import load_picture

    size = (4032, 3024)
    rgb, inside = disc_picture(size, center=(2100, 1400), radius=900)
    Image.fromarray(rgb).save(tmp_path / "IMG_0001.JPG", quality=85)
    Image.fromarray((inside * 255).astype(np.uint8), mode="L").save(tmp_path / "IMG_0001_mask.png")
    out_rgb, alpha = load_picture(str(tmp_path / "IMG_0001.JPG"), key="k", size=(64, 48),
                                  mask=str(tmp_path / "IMG_0001_mask.png"), mask_key="m")
    assert out_rgb.shape == (48, 64, 3) and alpha.shape == (48, 64, 1)
    # area averaging: each render pixel is the mean of the 63 x 63 picture pixels it covers
    expected = inside.reshape(48, 63, 64, 63).mean(axis=(1, 3))
    np.testing.assert_allclose(alpha[..., 0], expected, atol=1e-5)
    colour = rgb.reshape(48, 63, 64, 63, 3).mean(axis=(1, 3)) / 255
    assert np.abs(out_rgb - colour).max() < 0.03  # JPEG's error, averaged


def test_jpeg_background_key_needs_a_tolerance_and_an_odd_size_fits(tmp_path):
    from diffmpm_cli.assets.images import load_picture

    size = (1001, 751)  # odd, 4:3 within a pixel of 64x48
    rgb, inside = disc_picture(size, center=(480, 390), radius=250, background=(250, 250, 250))
    Image.fromarray(rgb).save(tmp_path / "odd.jpg", quality=70)
    with Image.open(tmp_path / "odd.jpg") as img:
        decoded = np.asarray(img, dtype=np.float32) / 255
    noise = np.abs(decoded - 250 / 255).max(-1)[~inside]
    assert (noise > 2 / 255).mean() > 0.001  # JPEG artefacts break an exact key...
    keyed = {}
    for tolerance in (2 / 255, 0.1):
        _, alpha = load_picture(str(tmp_path / "odd.jpg"), key="k", size=(64, 48), background=[250 / 255] * 3,
                                tolerance=tolerance)
        keyed[tolerance] = alpha[..., 0]
    truth = np.asarray(Image.fromarray(inside.astype(np.float32), mode="F").resize((64, 48), Image.Resampling.BOX))
    error = {t: np.abs(a - truth) for t, a in keyed.items()}
    assert error[0.1].max() < 0.15 and error[0.1].mean() < 0.005  # ...a tolerance keys it cleanly (edge ringing)
    assert error[2 / 255].mean() > 5 * error[0.1].mean(), (error[2 / 255].mean(), error[0.1].mean())


def test_picture_refusals(tmp_path):
    from diffmpm_cli.assets.images import load_picture

    Image.new("RGB", (100, 100)).save(tmp_path / "square.png")
    Image.new("RGBA", (80, 60)).save(tmp_path / "rgba.png")
    Image.new("L", (40, 30)).save(tmp_path / "small_mask.png")
    with pytest.raises(AssetError, match=r"aspect 1\) but render is 64x48: give a render size .* e.g. 64x64"):
        load_picture(str(tmp_path / "square.png"), key="k", size=(64, 48))
    with pytest.raises(AssetError, match="alpha channel too") as info:
        load_picture(str(tmp_path / "rgba.png"), key="k", size=(64, 48), mask=str(tmp_path / "small_mask.png"),
                     mask_key="target.images[0].mask")
    assert info.value.path == "target.images[0].mask"
    Image.new("RGB", (80, 60)).save(tmp_path / "rgb.png")
    with pytest.raises(AssetError, match="mask is 40x30 px but its image is 80x60"):
        load_picture(str(tmp_path / "rgb.png"), key="k", size=(64, 48), mask=str(tmp_path / "small_mask.png"),
                     mask_key="m")


# ---------------------------------------------------------------------------------------------------------------
# outputs a splat user opens


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A one-iteration run of a tiny scene exported z-up (Blender's convention)."""
    from diffmpm_cli.assets import build_assets
    from diffmpm_cli.optimize.run import optimize

    folder = tmp_path_factory.mktemp("run")
    data = copy.deepcopy(BASE_SCENE)
    data["sim"] = {"grid_resolution": 16, "dt": 1.0e-3, "steps": 12, "control_stride": 6, "frames": [4, 8]}
    data["render"]["width"] = data["render"]["height"] = 24
    data["appearance"] = {"surface_samples": 300}
    data["optimize"] = {"iterations": 1, "render_every": 0}
    data["evaluate"] = {"size": 16}
    data["output"] = {"turntable_frames": 0, "up_axis": "z"}
    scene = load_scene(write(folder, data))
    optimize(scene=scene, assets=build_assets(scene), out_dir=folder / "out")
    return scene, folder / "out"


def plyfile_gaussians(path):
    """A 3DGS PLY read with plyfile (an independent reader), covariances built from its scales and quaternions."""
    plyfile = pytest.importorskip("plyfile")
    v = plyfile.PlyData.read(str(path))["vertex"]
    q = np.stack([v[f"rot_{i}"] for i in range(4)], 1).astype(np.float64)
    R = np.stack([rotation_matrix(qi / np.linalg.norm(qi)) for qi in q])
    s = np.exp(np.stack([v[f"scale_{i}"] for i in range(3)], 1).astype(np.float64))
    return {"means": np.stack([v["x"], v["y"], v["z"]], 1).astype(np.float64),
            "covars": (R * s[:, None, :] ** 2) @ np.swapaxes(R, 1, 2),
            "opacities": 1 / (1 + np.exp(-np.asarray(v["opacity"], np.float64))),
            "colors": 0.28209479177387814 * np.stack([v[f"f_dc_{i}"] for i in range(3)], 1) + 0.5}


def test_every_kept_frame_is_a_ply_that_the_trajectory_rebuilds(small_run):
    from diffmpm_cli.optimize.outputs import rebuild_gaussians

    scene, out = small_run
    plys = sorted((out / "final" / "frames").glob("*.ply"))
    assert [p.name for p in plys] == ["frame_000004.ply", "frame_000008.ply", "frame_000012.ply"]
    for row, path in enumerate(plys):
        ply, rebuilt = plyfile_gaussians(path), rebuild_gaussians(out / "final" / "trajectory.npz", row=row)
        assert rebuilt["step"] == int(path.stem.split("_")[1])
        np.testing.assert_allclose(ply["means"], rebuilt["means"], atol=1e-6)
        scale = np.abs(rebuilt["covars"]).max()
        np.testing.assert_allclose(ply["covars"], rebuilt["covars"], atol=1e-4 * scale)
        np.testing.assert_allclose(ply["opacities"], rebuilt["opacities"], atol=1e-5)
        np.testing.assert_allclose(ply["colors"], rebuilt["colors"], atol=1e-5)
    assert (out / "final" / "gaussians.ply").read_bytes()[200:] == plys[-1].read_bytes()[200:]  # the final frame
    # z-up: the simulated world's +y (against gravity) is +z in the files
    y_up = rebuild_gaussians(out / "final" / "trajectory.npz", row=0, up_axis="y")
    z_up = rebuild_gaussians(out / "final" / "trajectory.npz", row=0)
    np.testing.assert_allclose(z_up["means"], y_up["means"][:, [0, 2, 1]] * [1, -1, 1], atol=1e-12)
    assert y_up["means"][:, 1].mean() == pytest.approx(z_up["means"][:, 2].mean())


def test_cameras_json_is_the_training_cameras_in_the_exported_world(small_run):
    from diffmpm_cli.outputs.ply import UP_ROTATIONS

    scene, out = small_run
    cams = build_cameras(scene.render, default_target=CENTER)
    exported = read_capture(out / "final" / "cameras.json", key="k")  # the INRIA layout, read back
    assert [c.name for c in exported] == list(cams.names)
    points = np.random.default_rng(1).uniform(0.3, 0.7, size=(10, 3))
    for c, cam in enumerate(exported):
        moved = points @ UP_ROTATIONS["z"].T
        p = moved @ cam.viewmat[:3, :3].T + cam.viewmat[:3, 3]
        uv = (p @ cam.K.T)[:, :2] / p[:, 2:]
        expected, _ = cams.project(points)
        # INRIA keeps no principal point (the image centre), the scene's cameras have theirs at the centre too
        np.testing.assert_allclose(uv, expected[c], atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# picture sequences and videos as targets


def sequence_scene(**sequence) -> dict:
    data = copy.deepcopy(BASE_SCENE)
    data["sim"] = {"grid_resolution": 16, "dt": 1.0e-3, "steps": 80, "control_stride": 80}
    data["target"] = {"sequences": [{"camera": "front", "path": "f_*.png", "fps": 50, **sequence}]}
    data["loss"] = {"grid_mass": 0.0, "silhouette": 1.0}
    return data


@pytest.mark.parametrize("fps, start, steps", [(50, 0.0, [0, 20, 40, 60, 80]), (30, 0.0, [0, 33, 67]),
                                               (50, 0.01, [10, 30, 50, 70]), (1000, 0.079, [79, 80])])
def test_sequence_pictures_map_to_the_nearest_steps(tmp_path, fps, start, steps):
    from diffmpm_cli.config.sequences import rollout_steps, sequence_steps

    scene = load_scene(write(tmp_path, sequence_scene(fps=fps, start=start)))
    assert sequence_steps(scene, 0) == steps
    assert rollout_steps(scene) == tuple(steps)  # kept without being listed in sim.frames


def test_sequence_refusals(tmp_path):
    for i in range(3):
        Image.new("RGB", (64, 64), "white").save(tmp_path / f"f_{i}.png")
    refused(invoke("validate", write(tmp_path, sequence_scene(fps=2000))), "target.sequences[0].fps", "faster")
    refused(invoke("validate", write(tmp_path, sequence_scene(start=0.5))), "target.sequences[0].start", "after")
    refused(invoke("validate", write(tmp_path, sequence_scene())), "target.sequences[0].path",
            "has 3 pictures, but 5 at 50 per s span the simulated 0.08 s")
    refused(invoke("validate", write(tmp_path, sequence_scene(path="g_*.png"))), "target.sequences[0].path",
            "matches no file")
    refused(invoke("validate", write(tmp_path, sequence_scene(camera="back", fps=25))), "target.sequences[0].camera",
            "no camera named 'back'")
    assert invoke("validate", write(tmp_path, sequence_scene(fps=25))).exit_code == 0  # 3 pictures: steps 0, 40, 80


def rgba_pictures(images, alphas, background=1.0) -> np.ndarray:
    """uint8 RGBA pictures [..., H, W, 4] of renders composited over a plain background (colour un-premultiplied)."""
    colour = ((images - (1 - alphas) * background) / np.maximum(alphas, 1e-6)).clip(0, 1)
    return (np.concatenate([colour, alphas], -1).clip(0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def true_motion(tmp_path_factory):
    """A sphere dropped on the floor (E = 6e4 Pa), its scene (E = 2e4 Pa to start from) and the true motion's
    pictures at 100 per s from two cameras: [7, 2, H, W, 4] uint8 RGBA."""
    import torch

    from diffmpm_cli.assets import build_assets
    from diffmpm_cli.optimize.targets import truth_parameters
    from diffmpm_cli.pipeline import Pipeline

    folder = tmp_path_factory.mktemp("motion")
    data = copy.deepcopy(BASE_SCENE)
    data["source"] = {"shape": "sphere", "radius": 0.12, "center": [0.5, 0.34, 0.5]}
    data["material"] = {"model": "neo_hookean", "E": 2.0e4, "nu": 0.3}
    data["sim"] = {"grid_resolution": 16, "dt": 1.0e-3, "steps": 60, "control_stride": 60,
                   "initial_velocity": [0.0, -2.0, 0.0], "floor": {"enabled": True, "height": 0.2}}
    data["learn"] = {"E": {"enabled": True, "lr": 0.2}}
    data["loss"] = {"grid_mass": 0.0, "silhouette": 1.0}
    data["render"] = {"width": 32, "height": 32, "rasterize_mode": "classic", "cameras": [
        {"type": "orbit", "azimuths": [0, 90], "elevation": 10, "radius": 2.0, "fov": 30, "target": [0.5, 0.34, 0.5]}]}
    data["optimize"] = {"iterations": 12, "render_every": 0, "schedule": {"kind": "cosine", "final_factor": 0.1},
                        "line_search": {"enabled": True}}
    data["evaluate"] = {"size": 16}
    data["output"] = {"turntable_frames": 0, "frame_plys": False}
    truth = copy.deepcopy(data)
    truth["target"] = {"truth": {"E": 6.0e4}}
    truth["sim"]["frames"] = list(range(0, 61, 10))
    scene = load_scene(write(folder, truth, "truth.yaml"))
    pipe = Pipeline(scene, build_assets(scene))
    with torch.no_grad():
        out = pipe.forward(truth_parameters(pipe))
    return data, rgba_pictures(out.images.numpy(), out.alphas.numpy())


def test_a_picture_sequence_identifies_a_material(tmp_path, true_motion):
    """Per camera, the true motion's pictures as a PNG sequence (steps from the fps alone, no sim.frames) drive E from
    2e4 Pa toward the truth (6e4 Pa)."""
    from diffmpm_cli.assets import build_assets
    from diffmpm_cli.optimize.run import optimize

    data, pictures = true_motion
    for k, picture in enumerate(pictures):
        for c in range(2):
            Image.fromarray(picture[c], "RGBA").save(tmp_path / f"cam{c}_{k:03d}.png")
    data = copy.deepcopy(data)
    data["target"] = {"sequences": [{"camera": f"orbit{c}", "path": f"cam{c}_*.png", "fps": 100} for c in range(2)]}
    scene = load_scene(write(tmp_path, data))
    assert scene.sim.frames == []
    summary = optimize(scene=scene, assets=build_assets(scene), out_dir=tmp_path / "out")
    found = summary["learned"]["E"]
    assert abs(found / 6.0e4 - 1) < 0.05, found  # within 5 % (measured: 6.0005e4 Pa after 12 iterations)
    assert summary["final"]["loss"] < 0.5 * summary["initial"]["loss"]


def test_a_video_target_gives_its_frames_at_their_steps(tmp_path, true_motion):
    iio = pytest.importorskip("imageio.v2")
    pytest.importorskip("imageio_ffmpeg")
    from diffmpm_cli.assets.sequences import sequence_pictures

    data, pictures = true_motion
    over_white = pictures[..., :3] * (pictures[..., 3:] / 255) + 255 * (1 - pictures[..., 3:] / 255)
    frames = [np.repeat(np.repeat(f, 2, 0), 2, 1).round().astype(np.uint8) for f in over_white[:, 1]]  # 64x64
    iio.mimwrite(tmp_path / "cam1.mp4", frames, fps=100, macro_block_size=1, quality=9)
    data = copy.deepcopy(data)
    data["target"] = {"image_background": [1, 1, 1], "image_background_tolerance": 0.1,
                      "sequences": [{"camera": "orbit1", "path": "cam1.mp4", "fps": 100}]}
    scene = load_scene(write(tmp_path, data))
    got = list(sequence_pictures(scene, 0))
    assert [step for step, _, _ in got] == list(range(0, 61, 10))
    for k, (_, rgb, alpha) in enumerate(got):
        assert rgb.shape == (32, 32, 3) and alpha.shape == (32, 32, 1)
        assert np.abs(rgb - over_white[k, 1] / 255).mean() < 0.02  # H.264's error, averaged over 2 x 2 pixels
        assert np.abs(alpha[..., 0] - pictures[k, 1, ..., 3] / 255).mean() < 0.05  # keyed against white
        if k:  # each picture is its own step's: closer to its own frame than to the previous one
            assert np.abs(rgb - over_white[k, 1] / 255).mean() < np.abs(rgb - over_white[k - 1, 1] / 255).mean()
    data["target"]["sequences"][0]["path"] = "missing.mp4"
    refused(invoke("validate", write(tmp_path, data)), "target.sequences[0].path", "file not found")


def test_a_phone_sized_photo_with_a_mask_from_a_capture_camera_is_fitted(tmp_path):
    """A 4032x3024 JPEG and its mask, seen by a camera of a transforms.json at that size, is the target of a 64x48
    run: the object's colour is learned from the downscaled photo."""
    import torch

    from diffmpm_cli.assets import build_assets
    from diffmpm_cli.optimize.run import optimize
    from diffmpm_cli.pipeline import Pipeline

    views, K = true_cameras()
    K = K.copy()
    K[:2] *= 4032 / 640  # the capture's camera at the phone's size (4032 / 640 = 3024 / 480)
    write_transforms(tmp_path / "transforms.json", views=views[:1], K=K, size=(4032, 3024))
    data = copy.deepcopy(BASE_SCENE)
    data["render"] = {"width": 64, "height": 48, "cameras": [{"type": "capture", "path": "transforms.json"}]}
    data["sim"] = {"grid_resolution": 16, "dt": 1.0e-3, "steps": 2, "control_stride": 2, "gravity": [0, 0, 0]}
    data["appearance"] = {"surface_samples": 800, "color": [0.2, 0.6, 0.3]}
    data["target"] = {"truth": {"v0": [0, 0, 0]}}
    data["loss"] = {"grid_mass": 0.0, "silhouette": 1.0}
    scene = load_scene(write(tmp_path, data, "truth.yaml"))
    pipe = Pipeline(scene, build_assets(scene))
    with torch.no_grad():
        out = pipe.forward({})
    # the photo: the object's own colour where the mask has any (3DGS's convention for masked pictures: the loader
    # composites alpha x picture + (1 - alpha) x background), a red wall elsewhere
    rgba = rgba_pictures(out.images[-1, 0].numpy(), out.alphas[-1, 0].numpy())
    mask = rgba[..., 3]
    picture = np.where(mask[..., None] > 0, rgba[..., :3], np.array([180, 30, 30], np.uint8))
    Image.fromarray(picture.repeat(63, 0).repeat(63, 1)).save(tmp_path / "view_0.jpg", quality=90)
    Image.fromarray(mask.repeat(63, 0).repeat(63, 1), mode="L").save(tmp_path / "view_0_mask.png")
    data["appearance"]["color"] = [0.8, 0.8, 0.8]  # the run starts from grey
    data["target"] = {"images": [{"path": "view_0.jpg", "mask": "view_0_mask.png", "camera": "view_0"}]}
    data["loss"] = {"grid_mass": 0.0, "silhouette": 1.0, "rgb_l1": 1.0}
    data["learn"] = {"color": {"enabled": True, "lr": 0.1}}
    data["optimize"] = {"iterations": 16, "render_every": 0, "schedule": {"kind": "cosine", "final_factor": 0.05},
                        "line_search": {"enabled": True}}
    data["evaluate"] = {"size": 16}
    data["output"] = {"turntable_frames": 0, "frame_plys": False}
    scene = load_scene(write(tmp_path, data))
    summary = optimize(scene=scene, assets=build_assets(scene), out_dir=tmp_path / "out")
    # measured: (0.199, 0.579, 0.297) from (0.8, 0.8, 0.8) in 16 iterations (JPEG chroma bleeds green into red)
    assert np.abs(np.asarray(summary["learned"]["color"]) - [0.2, 0.6, 0.3]).max() < 0.03, summary["learned"]


def test_a_masked_photo_is_composited_over_the_render_background(tmp_path):
    from diffmpm_cli.optimize.targets import target_picture

    rgb, inside = disc_picture((96, 96), center=(40, 50), radius=20, color=(20, 200, 40), background=(180, 30, 30))
    Image.fromarray(rgb).save(tmp_path / "photo.png")  # an object in front of a red wall
    Image.fromarray((inside * 255).astype(np.uint8), mode="L").save(tmp_path / "photo_mask.png")
    data = copy.deepcopy(BASE_SCENE)
    data["target"]["images"] = [{"path": "photo.png", "mask": "photo_mask.png", "camera": "front"}]
    data["render"]["background"] = [1.0, 1.0, 1.0]
    got_rgb, alpha = target_picture(load_scene(write(tmp_path, data)), 0)
    coverage = inside.reshape(32, 3, 32, 3).mean(axis=(1, 3))[..., None]
    expected = coverage * np.array([20, 200, 40]) / 255 + (1 - coverage) * 1.0  # the wall is replaced by white
    np.testing.assert_allclose(alpha, coverage, atol=1e-6)
    np.testing.assert_allclose(got_rgb, expected, atol=1e-5)
