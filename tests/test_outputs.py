"""Output files: Gaussian / particle PLYs (round trips, trimesh can open them) and pictures (PNG, grids, curves, GIFs)."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh
from PIL import Image

from diffmpm_cli.outputs import pictures
from diffmpm_cli.outputs.pictures import (
    comparison_grid,
    loss_curves,
    mp4_available,
    save_png,
    to_uint8,
    write_animation,
)
from diffmpm_cli.outputs.ply import (
    GAUSSIAN_PROPERTIES,
    read_gaussians_ply,
    read_vertex_ply,
    write_gaussians_ply,
    write_particles_ply,
)


def random_rotations(rng: np.random.Generator, count: int) -> np.ndarray:
    """[count,3,3] random proper rotations (QR of Gaussian matrices, det fixed to +1)."""
    q, r = np.linalg.qr(rng.normal(size=(count, 3, 3)))
    q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
    q[np.linalg.det(q) < 0, :, 0] *= -1
    return q


def random_gaussians(rng: np.random.Generator, count: int, scales: np.ndarray | None = None) -> dict[str, np.ndarray]:
    R = random_rotations(rng, count)
    if scales is None:
        scales = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), size=(count, 3)))  # standard deviations, m
    covars = (R * scales[:, None, :] ** 2) @ np.swapaxes(R, 1, 2)
    return {
        "means": rng.uniform(-1, 1, size=(count, 3)),
        "covars": covars,
        "colors": rng.uniform(0, 1, size=(count, 3)),
        "opacities": rng.uniform(0.01, 0.99, size=count),
    }


def relative_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-Gaussian ||a - b|| / ||b|| (Frobenius)."""
    return np.linalg.norm(a - b, axis=(1, 2)) / np.linalg.norm(b, axis=(1, 2))


# --- PLY ---------------------------------------------------------------------------------------------------------------


def test_gaussians_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    g = random_gaussians(rng, 200)
    path = write_gaussians_ply(tmp_path / "splats.ply", **g)
    back = read_gaussians_ply(path)
    assert {k: v.dtype for k, v in back.items()} == dict.fromkeys(g, np.float32)
    assert back["covars"].shape == (200, 3, 3)
    assert relative_error(back["covars"].astype(np.float64), g["covars"]).max() < 1e-5
    np.testing.assert_allclose(back["means"], g["means"], atol=1e-6)
    np.testing.assert_allclose(back["colors"], g["colors"], atol=1e-6)
    np.testing.assert_allclose(back["opacities"], g["opacities"], atol=1e-6)
    assert list(read_vertex_ply(path)) == list(GAUSSIAN_PROPERTIES)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_gaussians_accept_torch_and_match_3dgs_conventions(tmp_path):
    torch = pytest.importorskip("torch")
    covars = torch.diag(torch.tensor([4.0, 1.0, 0.25]))[None]  # axis-aligned: standard deviations 2, 1, 0.5 m
    path = write_gaussians_ply(tmp_path / "one.ply", means=torch.zeros(1, 3), covars=covars,
                               colors=torch.full((1, 3), 0.5), opacities=torch.tensor([0.5]))
    columns = read_vertex_ply(path)
    assert sorted(np.exp([columns[f"scale_{i}"][0] for i in range(3)])) == pytest.approx([0.5, 1.0, 2.0], rel=1e-6)
    quat = np.array([columns[f"rot_{i}"][0] for i in range(4)])
    assert np.linalg.norm(quat) == pytest.approx(1.0, abs=1e-6) and quat[0] >= 0
    assert columns["opacity"][0] == pytest.approx(0.0, abs=1e-6)  # logit(0.5)
    assert [columns[f"f_dc_{i}"][0] for i in range(3)] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    assert [columns[n][0] for n in ("nx", "ny", "nz")] == [0.0, 0.0, 0.0]


def test_degenerate_covariances_round_trip_finite(tmp_path):
    rng = np.random.default_rng(1)
    scales = np.array([[0.05, 0.02, 0.0], [0.05, 0.0, 0.0], [0.0, 0.0, 0.0], [0.03, 0.03, 1e-9]])
    g = random_gaussians(rng, len(scales), scales=scales)
    g["covars"][1] -= 1e-20 * np.eye(3)  # tiny negative eigenvalues from round-off
    g["opacities"] = np.array([0.0, 1.0, 0.5, 0.5])  # clamped before the logit
    back = read_gaussians_ply(write_gaussians_ply(tmp_path / "flat.ply", **g))
    assert all(np.all(np.isfinite(v)) for v in back.values())
    norm = np.linalg.norm(g["covars"], axis=(1, 2))
    error = np.linalg.norm(back["covars"] - g["covars"], axis=(1, 2))
    assert np.all(error <= 1e-5 * norm + 1e-12)
    np.testing.assert_allclose(back["opacities"], [0, 1, 0.5, 0.5], atol=2e-6)


def test_read_gaussians_from_other_tools(tmp_path):
    """Properties in another order, extra f_rest_* / uchar colours, no normals, and a leading element are fine."""
    rng = np.random.default_rng(2)
    g = random_gaussians(rng, 5)
    write_gaussians_ply(tmp_path / "ours.ply", **g)
    columns = read_vertex_ply(tmp_path / "ours.ply")
    for n in ("nx", "ny", "nz"):
        del columns[n]
    names = list(reversed(list(columns))) + [f"f_rest_{i}" for i in range(3)]
    fields = [(n, "<f4") for n in names] + [("red", "u1")]
    table = np.zeros(5, dtype=fields)
    for n in columns:
        table[n] = columns[n]
    table["red"] = 200
    header = ["ply", "format binary_little_endian 1.0", "comment from elsewhere", "element camera 1",
              "property double fx", "element vertex 5", *[f"property float {n}" for n in names],
              "property uchar red", "element face 0", "property list uchar int vertex_indices", "end_header"]
    data = ("\n".join(header) + "\n").encode() + np.array([1.5], "<f8").tobytes() + table.tobytes()
    (tmp_path / "other.ply").write_bytes(data)
    back = read_gaussians_ply(tmp_path / "other.ply")
    assert relative_error(back["covars"].astype(np.float64), g["covars"]).max() < 1e-5
    np.testing.assert_allclose(back["colors"], g["colors"], atol=1e-6)
    assert read_vertex_ply(tmp_path / "other.ply")["red"].tolist() == [200] * 5


def test_view_dependent_coefficients_are_written_channel_major_between_f_dc_and_opacity(tmp_path):
    """f_rest_* as the 3DGS trainer's save_ply writes them, read back with plyfile (an independent reader)."""
    plyfile = pytest.importorskip("plyfile")
    rng = np.random.default_rng(5)
    g = random_gaussians(rng, 6)
    for K in (3, 8, 15):
        rest = rng.normal(size=(6, K, 3))
        path = write_gaussians_ply(tmp_path / f"sh{K}.ply", **g, sh_rest=rest)
        vertex = plyfile.PlyData.read(str(path))["vertex"]
        names = [p.name for p in vertex.properties]
        assert names == [*GAUSSIAN_PROPERTIES[:9], *(f"f_rest_{i}" for i in range(3 * K)), *GAUSSIAN_PROPERTIES[9:]]
        for c in range(3):
            for k in range(K):
                np.testing.assert_allclose(vertex[f"f_rest_{c * K + k}"], rest[:, k, c], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(read_gaussians_ply(path)["colors"], g["colors"], atol=1e-6)  # f_rest skipped
    with pytest.raises(ValueError, match="sh_rest has shape"):
        write_gaussians_ply(tmp_path / "bad.ply", **g, sh_rest=np.zeros((6, 4, 3)))


def test_sh_rotations_turn_every_degree_as_3dgs_evaluates_it():
    """Degrees 1..3 in 3DGS's order and signs (its own eval_sh, the float64 twin): the turned coefficients give at d
    what the original ones give at R^T d, for proper rotations and reflections; blocks per degree; orthogonal."""
    torch = pytest.importorskip("torch")
    from diffmpm_cli.optimize.outputs import rotate_sh, sh_rotations
    from diffmpm_cli.reference.splats import eval_sh_ref

    g = torch.Generator().manual_seed(11)
    d = torch.float64
    R = torch.linalg.qr(torch.randn(6, 3, 3, generator=g, dtype=d))[0]  # three of them reflections
    R[:3] *= torch.sign(torch.det(R[:3]))[:, None, None]
    R[3:] *= -torch.sign(torch.det(R[3:]))[:, None, None]
    sh = torch.randn(6, 15, 3, generator=g, dtype=d)
    turned = rotate_sh(sh, R)
    dirs = torch.nn.functional.normalize(torch.randn(40, 3, generator=g, dtype=d), dim=1)
    zero = torch.zeros(1, 3, dtype=d)
    for m in range(6):
        for u in dirs:
            got = eval_sh_ref(3, torch.cat([zero, turned[m]]), u)
            want = eval_sh_ref(3, torch.cat([zero, sh[m]]), R[m].T @ u)
            np.testing.assert_allclose(got, want, atol=1e-12)
    M = sh_rotations(R, 3)
    mask = torch.block_diag(torch.ones(3, 3), torch.ones(5, 5), torch.ones(7, 7)).bool()
    assert float(M[:, ~mask].abs().max()) == 0.0
    np.testing.assert_allclose(M @ M.transpose(1, 2), torch.eye(15, dtype=d).expand(6, 15, 15), atol=1e-12)
    np.testing.assert_allclose(rotate_sh(sh[:, :3], R), turned[:, :3], atol=1e-12)  # degree 1 alone: same block
    # degree 1 is the 3x3 rotation itself in the basis order (y, z, x) with 3DGS's signs (-y, z, -x)
    P = torch.tensor([[0.0, -1, 0], [0, 0, 1], [-1, 0, 0]], dtype=d)  # a vector (x, y, z) -> its coefficients
    np.testing.assert_allclose(M[:, :3, :3], P @ R @ P.T, atol=1e-12)
    assert float(rotate_sh(sh[:, :0], R).abs().sum()) == 0.0


def test_read_rejects_non_gaussian_ply(tmp_path):
    write_particles_ply(tmp_path / "p.ply", positions=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="lacks Gaussian properties"):
        read_gaussians_ply(tmp_path / "p.ply")
    (tmp_path / "a.ply").write_text("ply\nformat ascii 1.0\nelement vertex 0\nend_header\n")
    with pytest.raises(ValueError, match="binary only"):
        read_gaussians_ply(tmp_path / "a.ply")


def test_particles_ply(tmp_path):
    rng = np.random.default_rng(3)
    positions = rng.uniform(size=(50, 3))
    J = rng.uniform(0.8, 1.2, size=50)
    path = write_particles_ply(tmp_path / "out" / "particles.ply", positions=positions, extra={"J": J})
    columns = read_vertex_ply(path)
    assert list(columns) == ["x", "y", "z", "J"]
    np.testing.assert_allclose(np.stack([columns[n] for n in "xyz"], axis=1), positions, atol=1e-6)
    np.testing.assert_allclose(columns["J"], J, atol=1e-6)
    with pytest.raises(ValueError):
        write_particles_ply(tmp_path / "bad.ply", positions=positions, extra={"J": J[:3]})


def test_trimesh_opens_ply_files(tmp_path):
    rng = np.random.default_rng(4)
    splats = write_gaussians_ply(tmp_path / "splats.ply", **random_gaussians(rng, 17))
    particles = write_particles_ply(tmp_path / "particles.ply", positions=rng.uniform(size=(23, 3)),
                                    extra={"J": np.ones(23)})
    for path, count in ((splats, 17), (particles, 23)):
        cloud = trimesh.load(path)
        assert isinstance(cloud, trimesh.PointCloud)
        assert len(cloud.vertices) == count


# --- pictures ----------------------------------------------------------------------------------------------------------


def test_to_uint8_channels_and_clipping():
    gray = np.array([[[-0.5], [0.5]], [[1.0], [2.0]]])
    out = to_uint8(gray)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[..., 0].tolist() == [[0, 128], [255, 255]] and np.all(out[..., 0] == out[..., 2])
    assert to_uint8(np.full((4, 5, 4), 0.2)).shape == (4, 5, 3)
    torch = pytest.importorskip("torch")
    assert np.array_equal(to_uint8(torch.ones(3, 2, 3)), np.full((3, 2, 3), 255, np.uint8))
    with pytest.raises(ValueError):
        to_uint8(np.zeros((4, 4, 2)))


def test_save_png(tmp_path):
    image = np.random.default_rng(5).uniform(size=(7, 9, 3))
    path = save_png(tmp_path / "a" / "b.png", image)
    with Image.open(path) as picture:
        assert picture.size == (9, 7)
        assert np.array_equal(np.asarray(picture.convert("RGB")), to_uint8(image))


def test_comparison_grid():
    views = [[np.zeros((8, 10, 3)), np.full((8, 10, 1), 0.5), np.ones((8, 10, 4))] for _ in range(2)]
    plain = comparison_grid(views, labels=[], scale=1)
    assert plain.dtype == np.uint8 and plain.shape == (2 * 8 + 2, 3 * 10 + 2 * 2, 3)
    assert np.all(plain[:, 10:12] == 255)  # white separator between columns
    grid = comparison_grid(views, labels=["target", "initial", "final"], scale=3)
    header = grid.shape[0] - (2 * 24 + 2)
    assert grid.shape[1] == 3 * 30 + 2 * 2 and header > 0
    assert np.any(grid[:header] < 128)  # the labels were drawn
    assert np.all(grid[header:header + 24, :30] == 0)  # first image upscaled into its cell


def test_loss_curves(tmp_path):
    history = [{"iteration": i, "loss": 10.0 ** -i, "silhouette": 0.5 / (i + 1), "note": "x"} for i in range(30)]
    history[3]["loss"] = float("nan")
    history[4]["loss"] = 0.0
    path = loss_curves(history, tmp_path / "curves" / "loss.png", size=(320, 200))
    with Image.open(path) as picture:
        assert picture.size == (320, 200)
        pixels = np.asarray(picture.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 3  # curves in colour, not just black on white
    for edge in ([], [{"loss": 1.0}], [{"loss": -1.0}], [{"iteration": 5, "loss": 2.0}, {"iteration": 5, "loss": 2.0}]):
        with Image.open(loss_curves(edge, tmp_path / "edge.png")) as picture:
            assert picture.size == (640, 400)
    loss_curves(history, tmp_path / "one_key.png", keys=["silhouette", "missing"])


def test_write_gif(tmp_path):
    frames = [np.full((12, 16, 3), i / 4) for i in range(5)]
    written = write_animation(tmp_path / "anim.gif", frames, fps=10)
    assert written == [tmp_path / "anim.gif"]
    with Image.open(written[0]) as gif:
        assert gif.n_frames == 5 and gif.size == (16, 12)
        assert gif.info.get("loop") == 0 and gif.info.get("duration") == 100
    with pytest.raises(ValueError):
        write_animation(tmp_path / "anim.avi", frames)
    with pytest.raises(ValueError):
        write_animation(tmp_path / "mixed.gif", [np.zeros((4, 4, 3)), np.zeros((5, 4, 3))])


def test_write_mp4(tmp_path, monkeypatch):
    frames = [np.full((9, 11, 3), i / 3) for i in range(4)]
    if mp4_available():
        written = write_animation(tmp_path / "anim.mp4", frames)
        assert written[0].stat().st_size > 0
    monkeypatch.setattr(pictures, "mp4_available", lambda: False)
    with pytest.raises(RuntimeError, match="imageio-ffmpeg"):
        write_animation(tmp_path / "none.mp4", frames)
    assert not (tmp_path / "none.mp4").exists()
