"""A trained 3DGS scene as the body (issue #15, part 4): PLYs written here with plyfile in the INRIA layout, as the
3DGS trainer's save_ply writes them (an independent writer), read, selected, filled, advected and rendered."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import BASE_SCENE
from typer.testing import CliRunner

from diffmpm_cli.cli import app
from diffmpm_cli.config import load_scene
from diffmpm_cli.reference.splats import eval_sh_ref, trained_gaussians_ref, view_colors_ref
from diffmpm_cli.splats import embedding_deformation, surface_gaussians, view_colors

plyfile = pytest.importorskip("plyfile")
runner = CliRunner()
CENTER = np.array([0.5, 0.5, 0.5])


def random_quaternions(rng, count):
    q = rng.normal(size=(count, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def tangent_quaternions(normals, rng):
    """(w, x, y, z) of rotations taking +z to each normal, turned by a random angle about it (discs on a surface)."""
    out = []
    for n, spin in zip(normals, rng.uniform(0, 2 * np.pi, len(normals))):
        axis = np.cross([0.0, 0.0, 1.0], n)
        s, c = np.linalg.norm(axis), n[2]
        half = 0.5 * math.atan2(s, c)
        a = axis / s if s > 1e-12 else np.array([1.0, 0.0, 0.0])
        tilt = np.array([math.cos(half), *(math.sin(half) * a)])
        twist = np.array([math.cos(spin / 2), 0.0, 0.0, math.sin(spin / 2)])  # about z first
        w1, x1, y1, z1 = tilt
        w2, x2, y2, z2 = twist
        out.append([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                    w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])
    return np.array(out)


def trained_cloud(rng, *, count=400, radius=0.12, degree=3, floaters=0):
    """Gaussians on a sphere's surface (a trained object is a shell), SH coefficients of ``degree``, and
    ``floaters`` faint Gaussians far away (what a crop and min_opacity remove)."""
    normal = rng.normal(size=(count, 3))
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    means = CENTER + radius * normal
    K = (degree + 1) ** 2 - 1
    disc = np.sqrt(4 * radius**2 / count) * 1.2  # tangent discs about as wide as the spacing of their centres
    cloud = {
        "means": means,
        "f_dc": rng.uniform(-0.8, 0.8, size=(count, 3)),  # colours C0 f_dc + 0.5 in (0.27, 0.73)
        "f_rest": 0.1 * rng.normal(size=(count, K, 3)),
        "opacity": rng.uniform(1.0, 3.0, size=count),  # logits: opacities 0.73..0.95
        "scale": np.log(np.stack([rng.uniform(0.8, 1.2, count) * disc, rng.uniform(0.8, 1.2, count) * disc,
                                  np.full(count, 0.15 * disc)], axis=1)),
        "rot": tangent_quaternions(normal, rng),
    }
    if floaters:
        far = CENTER + 0.35 + 0.02 * rng.normal(size=(floaters, 3))
        extra = trained_cloud(rng, count=floaters, degree=degree)
        extra["means"], extra["opacity"] = far, np.full(floaters, -4.0)  # opacity 0.018
        cloud = {k: np.concatenate([cloud[k], extra[k]]) for k in cloud}
    return cloud


def write_inria_ply(path, cloud):
    """The 3DGS trainer's GaussianModel.save_ply: attributes x y z nx ny nz f_dc_* f_rest_* opacity scale_* rot_*,
    f_rest flattened from features_rest [N, K, 3] transposed to [N, 3, K] (channel-major), float32."""
    count, K = cloud["f_rest"].shape[:2]
    names = (["x", "y", "z", "nx", "ny", "nz"] + [f"f_dc_{i}" for i in range(3)] + [f"f_rest_{i}" for i in range(3 * K)]
             + ["opacity"] + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)])
    f_rest = cloud["f_rest"].transpose(0, 2, 1).reshape(count, -1)
    attributes = np.concatenate([cloud["means"], np.zeros((count, 3)), cloud["f_dc"], f_rest,
                                 cloud["opacity"][:, None], cloud["scale"], cloud["rot"]], axis=1)
    elements = np.empty(count, dtype=[(n, "f4") for n in names])
    elements[:] = list(map(tuple, attributes))
    plyfile.PlyData([plyfile.PlyElement.describe(elements, "vertex")]).write(str(path))
    return path


def quaternion_matrix(q):
    """build_rotation of the 3DGS code (r, x, y, z), normalised."""
    r, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - r * z), 2 * (x * z + r * y)],
                     [2 * (x * y + r * z), 1 - 2 * (x * x + z * z), 2 * (y * z - r * x)],
                     [2 * (x * z - r * y), 2 * (y * z + r * x), 1 - 2 * (x * x + y * y)]])


def splat_scene(path, **source) -> dict:
    data = copy.deepcopy(BASE_SCENE)
    data["source"] = {"shape": "gaussians", "path": str(path), **source}
    data["target"] = {"truth": {"E": 3.0e4}}
    data["sim"] = {"grid_resolution": 16, "dt": 1.0e-3, "steps": 2, "control_stride": 2, "gravity": [0, 0, 0]}
    data["learn"] = {}
    data["loss"] = {"grid_mass": 0.0, "silhouette": 1.0}
    data["render"]["width"] = data["render"]["height"] = 32
    return data


def write(folder, data, name="scene.yaml"):
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def built(folder, cloud, **source):
    from diffmpm_cli.assets import build_assets
    from diffmpm_cli.pipeline import Pipeline

    ply = write_inria_ply(folder / "trained.ply", cloud)
    scene = load_scene(write(folder, splat_scene(ply, **source)))
    assets = build_assets(scene)
    return scene, assets, Pipeline(scene, assets)


def test_the_inria_layout_is_read_with_its_sh_order(tmp_path):
    from diffmpm_cli.assets.splat_source import read_splat_ply

    rng = np.random.default_rng(0)
    cloud = trained_cloud(rng, count=50)
    got = read_splat_ply(str(write_inria_ply(tmp_path / "t.ply", cloud)), key="k")
    assert got.degree == 3 and got.read == 50
    np.testing.assert_allclose(got.means, cloud["means"], atol=1e-6)
    np.testing.assert_allclose(got.sh_rest, cloud["f_rest"], atol=1e-6)  # [N, K, 3] back from channel-major
    np.testing.assert_allclose(got.colors, 0.28209479177387814 * cloud["f_dc"] + 0.5, atol=1e-6)
    np.testing.assert_allclose(got.opacities, 1 / (1 + np.exp(-cloud["opacity"])), atol=1e-6)
    for j in (0, 17, 49):  # build_covariance_from_scaling_rotation: (R S)(R S)^T
        L = quaternion_matrix(cloud["rot"][j]) @ np.diag(np.exp(cloud["scale"][j]))
        np.testing.assert_allclose(got.covars[j], L @ L.T, rtol=1e-5, atol=1e-10)


def test_selection_fill_and_its_report(tmp_path):
    rng = np.random.default_rng(1)
    cloud = trained_cloud(rng, count=1500, radius=0.2, floaters=30)
    scene, assets, pipe = built(tmp_path, cloud, crop_sphere={"center": CENTER.tolist(), "radius": 0.3})
    body = assets.source
    assert (body.splats.read, body.splats.kept) == (1530, 1500)  # the floaters are outside the crop
    covered, filled = body.filled
    spacing = assets.spacing
    # the shell of surface Gaussians covers a rim; the interior they enclose is filled: together a ball a little
    # larger than the surface (by up to two widened standard deviations, ~1.5 lattice spacings)
    assert filled > 0.3 * (covered + filled)
    volume = body.particle_count * spacing**3
    assert 4 / 3 * math.pi * 0.2**3 < volume < 4 / 3 * math.pi * (0.2 + 1.5 * spacing) ** 3
    _, unfilled, _ = built(tmp_path, cloud, crop_sphere={"center": CENTER.tolist(), "radius": 0.3}, fill=False)
    assert unfilled.source.filled == (covered, 0) and unfilled.source.particle_count == covered
    # min_opacity alone drops the floaters too (their opacity is 0.018)
    _, faint, _ = built(tmp_path, cloud, min_opacity=0.05)
    assert faint.source.splats.kept == 1500
    assert pipe.gaussian_count == 1500 and pipe.sigma0 == 1.0
    from diffmpm_cli.summary import summarize_scene  # validate reports the Gaussians it renders, not surface samples

    assert summarize_scene(scene=scene, assets=assets, camera_count=1).surface_gaussians == 1500


def render_trained_directly(pipe, cloud):
    """The trained Gaussians rendered as 3DGS would: covariance (R S)(R S)^T, colour eval_sh(dir) + 0.5 clamped at 0
    per camera (the test's own float64 SH), opacity sigmoid(logit); through the same rasteriser."""
    count = len(cloud["means"])
    covars = np.stack([(L := quaternion_matrix(cloud["rot"][j]) @ np.diag(np.exp(cloud["scale"][j]))) @ L.T
                       for j in range(count)])
    views = pipe.viewmats.double()
    colors = []
    for c in range(views.shape[0]):
        centre = -(views[c, :3, :3].T @ views[c, :3, 3]).numpy()
        row = []
        for j in range(count):
            d = cloud["means"][j] - centre
            sh = torch.from_numpy(np.concatenate([cloud["f_dc"][j][None], cloud["f_rest"][j]]))
            row.append(torch.clamp_min(eval_sh_ref(3, sh, torch.from_numpy(d / np.linalg.norm(d))) + 0.5, 0))
        colors.append(torch.stack(row))
    f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    return pipe.render(f32(cloud["means"]), f32(covars), torch.stack(colors).float(),
                       torch.sigmoid(f32(cloud["opacity"])), with_depth=False)


def test_a_degree_3_ply_through_an_identity_simulation_renders_as_itself(tmp_path):
    rng = np.random.default_rng(2)
    cloud = trained_cloud(rng, count=300)
    scene, assets, pipe = built(tmp_path, cloud)
    with torch.no_grad():
        out = pipe.forward({})  # no gravity, no velocity: the state stays at rest
        expected, expected_alpha, _ = render_trained_directly(pipe, cloud)
    np.testing.assert_allclose(out.result.x[-1], assets.source.positions, atol=1e-6)
    images, alphas = out.images[-1], out.alphas[-1]
    assert float(alphas.max()) > 0.9  # the object is in view
    assert float((images - expected).abs().max()) <= 1e-3
    assert float((alphas - expected_alpha).abs().max()) <= 1e-3
    # the view-dependent part matters: degree-0 colours alone differ
    with torch.no_grad():
        flat, _, _ = pipe.render(*pipe.gaussians(out.result.x[-1], out.result.F[-1], {}), with_depth=False)
    assert float((flat - expected).abs().max()) > 0.02


def test_diffmpm_render_draws_a_trained_sources_view_dependent_colours(tmp_path):
    """`diffmpm render` (render_frames) of a degree-3 source at rest gives the trained splats' own images, SH
    included, for the scene's cameras; it drew degree-0 colours before (> 0.02 off)."""
    from diffmpm_cli.optimize.replay import render_frames

    rng = np.random.default_rng(2)
    cloud = trained_cloud(rng, count=300)
    _, _, pipe = built(tmp_path, cloud)
    frames, names, images = render_frames(pipe, {}, frames=[0], cameras="scene", size=(pipe.width, pipe.height))
    with torch.no_grad():
        expected, _, _ = render_trained_directly(pipe, cloud)
    assert frames[0] == 0 and len(names) == expected.shape[0]
    assert float((images[0] - expected.cpu()).abs().max()) <= 1e-3


def test_gaussians_follow_a_homogeneous_deformation_and_rotation(tmp_path):
    rng = np.random.default_rng(3)
    cloud = trained_cloud(rng, count=120)
    scene, assets, pipe = built(tmp_path, cloud)
    X = pipe.x0.double()
    angle = 0.7
    R = torch.tensor([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]],
                     dtype=torch.float64)
    A = R @ torch.diag(torch.tensor([1.2, 0.9, 1.0], dtype=torch.float64))
    shift = torch.tensor([0.01, -0.02, 0.03], dtype=torch.float64)
    x, F = X @ A.T + shift, A.expand(len(X), 3, 3).clone()
    embedding = pipe.embedding.to(torch.float64)
    means, covars = surface_gaussians(x, F, embedding, sigma0=torch.tensor(1.0, dtype=torch.float64), thickness=0.1)
    rest = torch.as_tensor(assets.source.splats.means)
    np.testing.assert_allclose(means, rest @ A.T + shift, atol=1e-6)  # mu = A X + shift
    np.testing.assert_allclose(covars, A @ embedding.rest_covars @ A.T, rtol=1e-6, atol=1e-12)  # float32 weights
    # a rigid rotation: each Gaussian looks from camera c as the rest one looks from the camera turned back by R^T
    x, F = X @ R.T, R.expand(len(X), 3, 3).clone()
    means, _ = surface_gaussians(x, F, embedding, sigma0=torch.tensor(1.0, dtype=torch.float64), thickness=0.1)
    sh = pipe.sh_rest.double()
    colors = torch.as_tensor(assets.source.splats.colors)
    views = pipe.viewmats.double()
    turned = views.clone()
    turned[:, :3, :3] = views[:, :3, :3] @ R  # world -> camera of the camera turned by R^T about the origin
    moving = view_colors(colors, sh, means=means, Fbar=embedding_deformation(F, embedding), viewmats=views)
    still = view_colors(colors, sh, means=rest, Fbar=torch.eye(3, dtype=torch.float64).expand(len(rest), 3, 3),
                        viewmats=turned)
    np.testing.assert_allclose(moving, still, atol=1e-6)  # the embedding's float32 weights


def twin_inputs(seed=4, count=7, particles=9, cameras=2):
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    Xp = torch.rand(particles, 3, generator=g, dtype=d)
    samples = torch.rand(count, 3, generator=g, dtype=d)
    indices = torch.stack([torch.randperm(particles, generator=g)[:4] for _ in range(count)])
    weights = torch.rand(count, 4, generator=g, dtype=d)
    weights = weights / weights.sum(1, keepdim=True)
    L = torch.randn(count, 3, 3, generator=g, dtype=d) * 0.05
    rest = L @ L.transpose(1, 2) + 1e-4 * torch.eye(3, dtype=d)
    x = Xp + 0.05 * torch.randn(particles, 3, generator=g, dtype=d)
    F = torch.eye(3, dtype=d) + 0.2 * torch.randn(particles, 3, 3, generator=g, dtype=d)
    colors = torch.rand(count, 3, generator=g, dtype=d)
    sh_rest = 0.2 * torch.randn(count, 15, 3, generator=g, dtype=d)
    views = torch.eye(4, dtype=d).repeat(cameras, 1, 1)
    for c in range(cameras):
        q = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=d))[0]
        views[c, :3, :3] = q * torch.sign(torch.det(q))
        views[c, :3, 3] = torch.randn(3, generator=g, dtype=d) + torch.tensor([0, 0, 3.0], dtype=d)
    frame = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=d))[0]
    frame = frame * torch.sign(torch.det(frame))
    return dict(Xp=Xp, samples=samples, indices=indices, weights=weights, rest=rest, x=x, F=F, colors=colors,
                sh_rest=sh_rest, views=views, frame=frame)


def ours(t, x, F, colors, sh_rest):
    from diffmpm_cli.splats import SurfaceEmbedding

    e = SurfaceEmbedding(indices=t["indices"], weights=t["weights"],
                         offsets=t["samples"][:, None] - t["Xp"][t["indices"]], normals=torch.zeros_like(t["samples"]),
                         rest_covars=t["rest"])
    sigma0 = torch.tensor(1.3, dtype=torch.float64)
    means, covars = surface_gaussians(x, F, e, sigma0=sigma0, thickness=0.1)
    rgb = view_colors(colors, sh_rest, means=means, Fbar=embedding_deformation(F, e), viewmats=t["views"],
                      frame=t["frame"])
    return means, covars, rgb


def twin(t, x, F, colors, sh_rest):
    means, covars, Fbar = trained_gaussians_ref(x, F, samples_rest=t["samples"], particles_rest=t["Xp"],
                                                indices=t["indices"], weights=t["weights"], rest_covars=t["rest"],
                                                sigma0=1.3)
    return means, covars, view_colors_ref(colors, sh_rest, means=means, Fbar=Fbar, viewmats=t["views"], frame=t["frame"])


def test_trained_gaussians_match_their_float64_twin_forward_and_vjp():
    t = twin_inputs()
    inputs = [t[k].clone().requires_grad_(True) for k in ("x", "F", "colors", "sh_rest")]
    mine, ref = ours(t, *inputs), twin(t, *inputs)
    for a, b in zip(mine, ref):
        np.testing.assert_allclose(a.detach(), b.detach(), rtol=1e-10, atol=1e-12)
    g = torch.Generator().manual_seed(9)
    cotangents = [torch.randn(a.shape, generator=g, dtype=torch.float64) for a in mine]
    v_mine = torch.autograd.grad(sum((a * c).sum() for a, c in zip(mine, cotangents)), inputs)
    v_ref = torch.autograd.grad(sum((a * c).sum() for a, c in zip(ref, cotangents)), inputs)
    for a, b in zip(v_mine, v_ref):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_trained_gaussians_gradients_match_finite_differences():
    t = twin_inputs(seed=5, count=4, particles=6, cameras=2)

    def fn(x, F, colors, sh_rest):
        return ours(t, x, F, colors, sh_rest)

    inputs = tuple(t[k].clone().requires_grad_(True) for k in ("x", "F", "colors", "sh_rest"))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_check_grad_covers_a_trained_source(tmp_path):
    """check-grad on a trained source: E through the whole pipeline (view-dependent colours included), sigma0 and
    x, F through the splats, colour, opacity, means and covariances through the renderer. One degree-0 colour for all
    Gaussians: where overlapping Gaussians of different colours swap depth order within a finite-difference step,
    the sorted compositing jumps and no central difference along their means converges (measured: with random
    colours the render stage's means row fails, AD 1.1 vs FD -4.7; with one colour it passes, 0.506 vs 0.504)."""
    rng = np.random.default_rng(6)
    cloud = trained_cloud(rng, count=150)
    cloud["f_dc"][:] = 0.3  # one degree-0 colour; the view-dependent degrees 1-3 still differ per Gaussian
    ply = write_inria_ply(tmp_path / "trained.ply", cloud)
    data = splat_scene(ply)
    data["sim"].update(steps=6, control_stride=3, gravity=[0, -9.81, 0])
    data["learn"] = {"E": {"enabled": True}, "color": {"enabled": True, "per_gaussian": True},
                     "opacity": {"enabled": True, "per_gaussian": True}, "sigma0": {"enabled": True}}
    result = runner.invoke(app, ["check-grad", str(write(tmp_path, data)), "--stage", "splats,render,all",
                                 "--param", "E,color,opacity,sigma0", "--probes", "3", "--coordinates", "1",
                                 "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    import json

    rows = json.loads(result.stdout)["rows"]
    checked = {(r["stage"], r["parameter"]) for r in rows}
    assert {("splats", "log_sigma0"), ("render", "color"), ("render", "opacity_logit"), ("all", "log_E")} <= checked
    assert all(r["passed"] for r in rows), rows


def test_refusals_are_one_line(tmp_path):
    import trimesh

    mesh_ply = tmp_path / "mesh.ply"
    trimesh.creation.icosphere(radius=0.1).apply_translation(CENTER).export(mesh_ply)
    for source, key, fragment in [
        ({"path": str(mesh_ply)}, "source.path", "a point cloud or mesh, not trained Gaussians"),
        ({"path": "trained.ply", "crop_box": [[0, 0, 0], [0.1, 0.1, 0.1]]}, "source", "no Gaussian of the 200"),
        ({"path": "trained.ply", "min_opacity": 0.99}, "source", "lower min_opacity"),
    ]:
        write_inria_ply(tmp_path / "trained.ply", trained_cloud(np.random.default_rng(7), count=200))
        data = splat_scene(tmp_path / "x.ply")
        data["source"] = {"shape": "gaussians", **source}
        result = runner.invoke(app, ["validate", str(write(tmp_path, data))])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith(f"error: {key}: ") and fragment in lines[0], lines[0]
    data = splat_scene(tmp_path / "trained.ply")
    data["learn"] = {"color": {"enabled": True}}
    result = runner.invoke(app, ["validate", str(write(tmp_path, data))])
    assert result.exit_code == 2 and result.stderr.startswith("error: learn.color.per_gaussian: "), result.stderr


def test_a_run_from_a_trained_source_reports_the_fill_and_writes_its_frames(tmp_path):
    from diffmpm_cli.assets import build_assets
    from diffmpm_cli.optimize.outputs import rebuild_gaussians
    from diffmpm_cli.optimize.run import optimize

    rng = np.random.default_rng(8)
    ply = write_inria_ply(tmp_path / "trained.ply", trained_cloud(rng, count=300, degree=1))
    data = splat_scene(ply)
    data["sim"].update(steps=8, control_stride=8, gravity=[0, -9.81, 0], frames=[4])
    data["learn"] = {"E": {"enabled": True}}
    data["optimize"] = {"iterations": 1, "render_every": 0}
    data["evaluate"] = {"size": 16}
    data["output"] = {"turntable_frames": 2, "up_axis": "-y"}
    scene = load_scene(write(tmp_path, data))
    summary = optimize(scene=scene, assets=build_assets(scene), out_dir=tmp_path / "out")
    report = summary["source_gaussians"]
    assert report["read"] == report["kept"] == 300 and report["sh_degree"] == 1
    assert report["particles_filled"] > 0 and 0 < report["filled_share"] < 1
    final = tmp_path / "out" / "final"
    assert sorted(p.name for p in (final / "frames").glob("*.ply")) == ["frame_000004.ply", "frame_000008.ply"]
    rebuilt = rebuild_gaussians(final / "trajectory.npz", row=1)
    ply_back = plyfile.PlyData.read(str(final / "frames" / "frame_000008.ply"))["vertex"]
    np.testing.assert_allclose(np.stack([ply_back[k] for k in "xyz"], 1), rebuilt["means"], atol=1e-6)
    # the view-dependent degree is written, turned by each Gaussian's local rotation and the up axis
    assert rebuilt["sh_rest"].shape == (300, 3, 3)
    np.testing.assert_allclose(ply_f_rest(ply_back, 3), rebuilt["sh_rest"], atol=1e-6)
    assert rebuilt["means"][:, 1].mean() == pytest.approx(-np.load(final / "trajectory.npz")["x"][1][:, 1].mean(),
                                                          abs=0.02)  # -y up: the simulation's +y is -y


def ply_f_rest(vertex, K):
    """f_rest_* of a plyfile vertex element as [N, K, 3] (the trainer's channel-major order undone)."""
    return np.stack([np.asarray(vertex[f"f_rest_{i}"], np.float64) for i in range(3 * K)], 1).reshape(-1, 3, K)\
        .transpose(0, 2, 1)


def random_rotations(g, count):
    q = torch.linalg.qr(torch.randn(count, 3, 3, generator=g, dtype=torch.float64))[0]
    return q * torch.sign(torch.det(q))[:, None, None]


def random_views(g, count):
    views = torch.eye(4, dtype=torch.float64).repeat(count, 1, 1)
    views[:, :3, :3] = random_rotations(g, count)
    views[:, :3, 3] = torch.randn(count, 3, generator=g, dtype=torch.float64) + torch.tensor([0, 0, 3.0])
    return views


def exported_colors(colors, sh_file, means, views, up):
    """What a 3DGS viewer shows: eval_sh (the trainer's, float64 twin) of the file's coefficients at the direction
    from each camera centre to each mean, both turned to the file's up axis by ``up``, + 0.5, clamped at 0."""
    from diffmpm_cli.splats import SH_C0

    out = torch.zeros(views.shape[0], len(means), 3, dtype=torch.float64)
    for c in range(views.shape[0]):
        centre = -(views[c, :3, :3].T @ views[c, :3, 3])
        for m in range(len(means)):
            d = up @ (means[m] - centre)
            sh = torch.cat([((colors[m] - 0.5) / SH_C0)[None], sh_file[m]])
            out[c, m] = torch.clamp_min(eval_sh_ref(3, sh, d / torch.linalg.norm(d)) + 0.5, 0.0)
    return out


@pytest.mark.parametrize("up_axis", ["y", "z", "-y"])
def test_exported_sh_gives_the_renderers_colours_from_every_view(up_axis):
    """A rigid local motion (Fbar a rotation R) of Gaussians placed by a rotation ``frame``: the renderer evaluates
    their degree-3 SH at frame^T R^T d; a frame PLY's coefficients, turned by U R frame (U: the up axis's
    rotation), evaluated as a 3DGS viewer does at the file's direction U d, give the same colours from every view
    (float64; the test allows 1e-5)."""
    from diffmpm_cli.optimize.outputs import polar_rotations, rotate_sh
    from diffmpm_cli.outputs.ply import UP_ROTATIONS

    g = torch.Generator().manual_seed(12)
    count = 6
    R, frame = random_rotations(g, count), random_rotations(g, 1)[0]
    colors = torch.rand(count, 3, generator=g, dtype=torch.float64)
    sh = 0.3 * torch.randn(count, 15, 3, generator=g, dtype=torch.float64)
    means = 0.2 * torch.randn(count, 3, generator=g, dtype=torch.float64)
    views = random_views(g, 7)
    rendered = view_colors(colors, sh, means=means, Fbar=R, viewmats=views, frame=frame)
    U = torch.as_tensor(UP_ROTATIONS[up_axis])
    exported = exported_colors(colors, rotate_sh(sh, U @ polar_rotations(R) @ frame), means, views, U)
    np.testing.assert_allclose(exported, rendered, atol=1e-5)
    assert float((exported - rendered).abs().max()) < 1e-12  # float64: to rounding
    unturned = exported_colors(colors, sh, means, views, U)  # the rotation matters here
    assert float((unturned - rendered).abs().max()) > 0.05


def test_frame_sh_turn_with_the_polar_rotation_of_a_sheared_stretched_deformation():
    """float64, random F = Q S with shear and non-uniform stretch (S symmetric positive definite, not diagonal): the
    rotation each Gaussian's SH is turned by (splat_rotations: polar rotation of Fbar = sum_p w_p F_p, times the
    placement frame) is Q frame; for random particle F it is a rotation with R^T Fbar symmetric positive definite.
    The exported colours are the renderer's with the local deformation's stretch taken out (Fbar -> its rotation);
    the renderer's own colours under the stretch differ (a 3DGS file holds only rotated coefficients)."""
    from diffmpm_cli.optimize.outputs import polar_rotations, rotate_sh, splat_rotations
    from diffmpm_cli.splats import SurfaceEmbedding

    t = twin_inputs(seed=13, count=6, particles=9, cameras=5)
    g = torch.Generator().manual_seed(14)
    e = SurfaceEmbedding(indices=t["indices"], weights=t["weights"],
                         offsets=t["samples"][:, None] - t["Xp"][t["indices"]], normals=torch.zeros_like(t["samples"]),
                         rest_covars=t["rest"])
    # a homogeneous F = Q S: every Gaussian's Fbar is F, its polar rotation Q
    Q = random_rotations(g, 1)[0]
    S = torch.tensor([[1.4, 0.25, -0.1], [0.25, 0.7, 0.15], [-0.1, 0.15, 1.1]], dtype=torch.float64)
    assert float(torch.linalg.eigvalsh(S).min()) > 0.3
    F = (Q @ S).expand(9, 3, 3)
    np.testing.assert_allclose(splat_rotations(F, e, t["frame"]), (Q @ t["frame"]).expand(6, 3, 3), atol=1e-12)
    # random particle F (t["F"] = I + 0.2 N(0, 1)): a proper rotation whose R^T Fbar is symmetric positive definite
    Fbar = embedding_deformation(t["F"], e)
    R = polar_rotations(Fbar)
    np.testing.assert_allclose(R.transpose(1, 2) @ R, torch.eye(3, dtype=torch.float64).expand(6, 3, 3), atol=1e-12)
    np.testing.assert_allclose(torch.det(R), torch.ones(6, dtype=torch.float64), atol=1e-12)
    sym = R.transpose(1, 2) @ Fbar
    np.testing.assert_allclose(sym, sym.transpose(1, 2), atol=1e-12)
    assert float(torch.linalg.eigvalsh(sym).min()) > 0
    np.testing.assert_allclose(splat_rotations(t["F"], e, t["frame"]), R @ t["frame"], atol=1e-12)
    # the colours the file holds
    means, _ = surface_gaussians(t["x"], t["F"], e, sigma0=torch.tensor(1.0, dtype=torch.float64), thickness=0.1)
    eye = torch.eye(3, dtype=torch.float64)
    exported = exported_colors(t["colors"], rotate_sh(t["sh_rest"], splat_rotations(t["F"], e, t["frame"])), means,
                               t["views"], eye)
    rigid = view_colors(t["colors"], t["sh_rest"], means=means, Fbar=R, viewmats=t["views"], frame=t["frame"])
    np.testing.assert_allclose(exported, rigid, atol=1e-5)
    stretched = view_colors(t["colors"], t["sh_rest"], means=means, Fbar=Fbar, viewmats=t["views"], frame=t["frame"])
    assert float((exported - stretched).abs().max()) > 1e-3


@pytest.mark.parametrize("placed", [False, True])
def test_a_degree_3_ply_through_an_identity_simulation_exports_its_own_coefficients(tmp_path, placed):
    """INRIA PLY (degree 3) -> identity simulation -> frame PLY: the same SH coefficients (float32 files; 1e-6).
    ``placed``: put in the scene turned 180 degrees about x (a COLMAP-like capture) and exported with up_axis -y,
    which turns it back: the file's coefficients are again the input's."""
    from diffmpm_cli.assets import build_assets
    from diffmpm_cli.optimize.outputs import state_splats, write_splats
    from diffmpm_cli.pipeline import Pipeline

    rng = np.random.default_rng(15)
    cloud = trained_cloud(rng, count=200)
    ply = write_inria_ply(tmp_path / "trained.ply", cloud)
    data = splat_scene(ply)
    if placed:
        data["source"]["world_from_capture"] = [[1, 0, 0, 0], [0, -1, 0, 1], [0, 0, -1, 1], [0, 0, 0, 1]]
        data["output"] = {"up_axis": "-y"}
    scene = load_scene(write(tmp_path, data))
    assets = build_assets(scene)
    pipe = Pipeline(scene, assets)
    assert assets.source.splats.kept == 200
    with torch.no_grad():
        out = pipe.forward({})  # no gravity, no velocity: F stays I
        path = write_splats(tmp_path / "frame.ply", **state_splats(pipe, {}, out.result.x[-1], out.result.F[-1]),
                            up_axis=scene.output.up_axis)
    vertex = plyfile.PlyData.read(str(path))["vertex"]
    np.testing.assert_allclose(ply_f_rest(vertex, 15), cloud["f_rest"], atol=1e-6)
    np.testing.assert_allclose(np.stack([vertex[f"f_dc_{i}"] for i in range(3)], 1), cloud["f_dc"], atol=1e-6)
    np.testing.assert_allclose(np.stack([vertex[k] for k in "xyz"], 1), cloud["means"] - np.array([0.0, 1.0, 1.0]) * placed,
                               atol=1e-6)  # -y turns (x, 1 - y, 1 - z) to (x, y - 1, z - 1)
