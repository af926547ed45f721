"""The rasteriser: Warp vs the float64 twin (forward, VJP), finite differences, degenerate input, counts."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

from diffmpm_cli.errors import RenderCapacityError
from diffmpm_cli.gradcheck import directional_probes
from diffmpm_cli.reference.splat import (
    intersection_count_ref,
    orbit_cameras,
    project_ref,
    random_gaussians,
    rasterize_ref,
)
from diffmpm_cli.render.rasterize import RasterCutoffs, covars_from_quats_scales, rasterization

SIZE = 64


def warp_render(means, covars, opac, colors, views, Ks, *, device="cpu", size=SIZE, **kw):
    on = lambda t: t.float().to(device)  # noqa: E731
    bg = kw.pop("backgrounds", None)
    img, alpha, meta = rasterization(on(means), on(covars), on(opac), on(colors), on(views), on(Ks), size, size,
                                     backgrounds=None if bg is None else on(bg), **kw)
    return img.cpu(), alpha.cpu(), meta


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,raster", [("RGB", "classic"), ("RGB+ED", "classic"), ("ED", "classic"),
                                         ("RGB+ED", "antialiased")])
def test_forward_matches_the_twin(mode, raster, device):
    # inputs the kernels can hold exactly (float32): the antialiasing compensation of a needle-thin Gaussian, the
    # root of a nearly cancelling determinant, would otherwise mostly measure the rounding of its covariance
    means, covars, opac, colors = (t.float().double() for t in random_gaussians(500, seed=1))
    views, Ks = orbit_cameras(2, SIZE, SIZE)
    bg = torch.rand(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref_img, ref_alpha, unsure = rasterize_ref(means, covars, opac, colors, views, Ks, SIZE, SIZE, backgrounds=bg,
                                               render_mode=mode, rasterize_mode=raster, return_ambiguous=True)
    img, alpha, meta = warp_render(means, covars, opac, colors, views, Ks, backgrounds=bg, render_mode=mode,
                                   rasterize_mode=raster, device=device)
    assert img.shape == ref_img.shape and alpha.shape == ref_alpha.shape
    sure = ~unsure
    assert float(unsure.float().mean()) < 0.01  # the comparison covers nearly every pixel
    assert float(ref_alpha.max()) > 0.99 and float(ref_alpha.min()) < 0.01  # opaque and empty pixels both occur
    assert float((img.double() - ref_img).abs()[sure].max()) <= 1e-4
    assert float((alpha.double() - ref_alpha).abs()[sure].max()) <= 1e-4
    means2d, _, _, radii = project_ref(means, covars, opac, views, Ks, SIZE, SIZE, 0.01, 1e10,
                                       antialiased=raster == "antialiased")
    assert torch.equal(meta.radii.cpu().long(), radii)
    assert meta.intersection_count == intersection_count_ref(means2d, radii, SIZE, SIZE)


@pytest.mark.parametrize("channels", [1, 4])
def test_channel_counts(channels):
    means, covars, opac, _ = random_gaussians(120, seed=2)
    colors = torch.rand(120, channels, dtype=torch.float64)
    views, Ks = orbit_cameras(1, 32, 32)
    ref_img, _, unsure = rasterize_ref(means, covars, opac, colors, views, Ks, 32, 32, return_ambiguous=True)
    img, _, _ = warp_render(means, covars, opac, colors, views, Ks, size=32)
    assert img.shape == (1, 32, 32, channels)
    assert float((img.double() - ref_img).abs()[~unsure].max()) <= 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("raster", ["classic", "antialiased"])
def test_backward_matches_the_twin_by_random_cotangents(device, raster):
    means, covars, opac, colors = (t.float().double() for t in random_gaussians(150, seed=3))  # float32-exact
    views, Ks = orbit_cameras(2, 32, 32)
    bg = torch.rand(2, 3, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    v_img = torch.randn(2, 32, 32, 4, generator=g, dtype=torch.float64)
    v_alpha = torch.randn(2, 32, 32, 1, generator=g, dtype=torch.float64)
    inputs = {"means": means, "covars": covars, "opacities": opac, "colors": colors, "backgrounds": bg}

    def grads(use_warp):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        args = (leaves["means"], leaves["covars"], leaves["opacities"], leaves["colors"])
        if use_warp:
            img, alpha, _ = warp_render(*args, views, Ks, size=32, backgrounds=leaves["backgrounds"],
                                        render_mode="RGB+ED", rasterize_mode=raster, device=device)
            mask = ~unsure[..., None]
        else:
            img, alpha, unsure_ref = rasterize_ref(*args, views, Ks, 32, 32, backgrounds=leaves["backgrounds"],
                                                   render_mode="RGB+ED", rasterize_mode=raster, return_ambiguous=True)
            mask = ~unsure_ref[..., None]
        total = (img.double() * v_img * mask).sum() + (alpha.double() * v_alpha * mask).sum()
        return dict(zip(leaves, torch.autograd.grad(total, list(leaves.values())), strict=True))

    _, _, unsure = rasterize_ref(means, covars, opac, colors, views, Ks, 32, 32, backgrounds=bg, render_mode="RGB+ED",
                                 rasterize_mode=raster, return_ambiguous=True)
    v_warp, v_ref = grads(True), grads(False)
    # only the symmetric part of a covariance gradient is defined (the input is symmetric)
    v_ref["covars"] = 0.5 * (v_ref["covars"] + v_ref["covars"].transpose(1, 2))
    for name in inputs:
        err = float((v_warp[name].double().cpu() - v_ref[name]).norm() / v_ref[name].norm())
        assert err <= 1e-3, f"d/d{name}: relative L2 error {err:.2e}"


@pytest.mark.parametrize("raster", ["classic", "antialiased"])
def test_finite_differences_through_the_kernels(raster):
    """Wide, semi-transparent Gaussians rendered with the cut-offs made continuous (RasterCutoffs.smooth, as
    check-grad does): at gsplat's 1/255 and 1e-4 a crossing is a jump no difference quotient converges through."""
    g = torch.Generator().manual_seed(5)
    means = torch.randn(6, 3, generator=g) * 0.1
    covars = covars_from_quats_scales(torch.randn(6, 4, generator=g), 0.4 + 0.2 * torch.rand(6, 3, generator=g))
    opac = 0.2 + 0.3 * torch.rand(6, generator=g)
    colors = torch.rand(6, 3, generator=g)
    views, Ks = orbit_cameras(1, 32, 32)
    weights = torch.randn(1, 32, 32, 3, generator=g, dtype=torch.float64)

    def loss(p):
        covs = 0.5 * (p["covars"] + p["covars"].transpose(1, 2))
        img, alpha, _ = warp_render(p["means"], covs, p["opacities"], p["colors"], views, Ks, size=32,
                                    cutoffs=RasterCutoffs.smooth(), rasterize_mode=raster)
        return (img.double() * weights).sum() + alpha.double().sum()

    params = {"means": means, "covars": covars, "opacities": opac, "colors": colors}
    # steps up to 2 eps (Richardson): small enough that no two Gaussians swap depth order (a true discontinuity)
    probes = directional_probes(loss, params, eps={"means": 5e-3, "covars": 5e-3, "opacities": 5e-3, "colors": 5e-3},
                                probes=2, coordinates=1, seed=7)
    assert len(probes) == 12
    for probe in probes:  # within 1 % plus 3 standard deviations of the measured float32 noise
        assert abs(probe.ad - probe.fd) <= 1e-2 * max(abs(probe.ad), abs(probe.fd)) + 3 * probe.noise, probe


def test_degenerate_input_stays_finite():
    views, Ks = orbit_cameras(1, 32, 32)
    bg = torch.tensor([[0.2, 0.4, 0.6]])
    # N = 0: the background, alpha 0, and the background's gradient
    bg_leaf = bg.clone().requires_grad_(True)
    img, alpha, meta = warp_render(torch.zeros(0, 3), torch.zeros(0, 3, 3), torch.zeros(0), torch.zeros(0, 3), views,
                                   Ks, size=32, backgrounds=bg_leaf)
    assert torch.allclose(img, bg.expand(32 * 32, 3).reshape(1, 32, 32, 3)) and float(alpha.abs().max()) == 0.0
    assert meta.intersection_count == 0
    img.sum().backward()
    assert torch.equal(bg_leaf.grad, torch.full((1, 3), 32.0 * 32.0))
    # all culled (behind the camera): the background; gradients zero and finite
    means = torch.tensor([[0.0, 0.0, 4.0], [0.1, 0.0, 5.0]], requires_grad=True)
    covars = (0.01 * torch.eye(3)).expand(2, 3, 3).clone().requires_grad_(True)
    opac = torch.tensor([0.5, 0.9], requires_grad=True)
    colors = torch.rand(2, 3, requires_grad=True)
    img, alpha, meta = rasterization(means, covars, opac, colors, views.float(), Ks.float(), 32, 32, backgrounds=bg)
    assert torch.allclose(img, bg.expand(32 * 32, 3).reshape(1, 32, 32, 3)) and meta.intersection_count == 0
    (img.sum() + alpha.sum()).backward()
    for t in (means, covars, opac, colors):
        assert torch.isfinite(t.grad).all() and float(t.grad.abs().max()) == 0.0
    # det ~ 0 (a flat disc seen edge-on, and a zero covariance) and opacity -> 1
    means = torch.tensor([[0.0, 0.0, 0.0], [0.05, 0.0, 0.0], [0.0, 0.05, 0.0]], requires_grad=True)
    covars = torch.stack([torch.diag(torch.tensor([0.01, 0.01, 0.0])), torch.zeros(3, 3),
                          torch.diag(torch.tensor([0.0, 0.02, 0.02]))]).requires_grad_(True)
    opac = torch.tensor([1.0, 0.99999, 1.0], requires_grad=True)
    img, alpha, _ = rasterization(means, covars, opac, torch.rand(3, 3), views.float(), Ks.float(), 32, 32)
    (img.sum() + alpha.sum()).backward()
    assert torch.isfinite(img).all() and float(alpha.max()) <= 1.0 and float(alpha.max()) > 0.9
    for t in (means, covars, opac):
        assert torch.isfinite(t.grad).all()


def test_quats_scales_path_gives_gradients():
    quats = torch.tensor([[1.0, 0.2, -0.1, 0.3]] * 5, requires_grad=True)
    scales = torch.full((5, 3), 0.05, requires_grad=True)
    covars = covars_from_quats_scales(quats, scales)
    R = covars_from_quats_scales(quats.detach(), torch.ones(5, 3))
    assert torch.allclose(R, torch.eye(3).expand(5, 3, 3), atol=1e-6)  # unit scales: identity covariance
    means = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)) * 0.2
    views, Ks = orbit_cameras(1, 32, 32)
    img, alpha, _ = rasterization(means, covars, torch.full((5,), 0.8), torch.rand(5, 3), views.float(), Ks.float(),
                                  32, 32)
    alpha.sum().backward()
    assert float(scales.grad.abs().sum()) > 0 and torch.isfinite(quats.grad).all()


@pytest.mark.parametrize("channels,raster", [(3, "classic"), (6, "classic"), (3, "antialiased")])
def test_the_raster_paths_agree(channels, raster):
    """The GPU block path (run on the CPU with cooperative lanes) and the CPU tile path give the same images and
    gradients; 40 px is not a multiple of the 16 px tile, and 6 channels pass the 4 kept in shared memory."""
    means, covars, opac, _ = (t.float() for t in random_gaussians(300, seed=8))
    colors = torch.rand(300, channels, generator=torch.Generator().manual_seed(2))
    views, Ks = (t.float() for t in orbit_cameras(2, 40, 40))
    out = {}
    for path in ("tile", "block"):
        leaves = [t.clone().requires_grad_(True) for t in (means, covars, opac, colors)]
        bg = torch.linspace(0.2, 1.0, 2 * channels).reshape(2, channels).requires_grad_(True)
        img, alpha, meta = rasterization(*leaves, views, Ks, 40, 40, render_mode="RGB+ED", path=path,
                                         backgrounds=bg, rasterize_mode=raster)
        w = torch.randn(img.shape, generator=torch.Generator().manual_seed(1))
        ((img * w).sum() + alpha.sum()).backward()
        out[path] = (img.detach(), alpha.detach(), [*(t.grad for t in leaves), bg.grad])
    assert torch.allclose(out["block"][0], out["tile"][0], atol=1e-5)
    assert torch.allclose(out["block"][1], out["tile"][1], atol=1e-6)
    for a, b in zip(out["block"][2], out["tile"][2], strict=True):
        assert float((a - b).norm() / b.norm()) <= 1e-4


@pytest.mark.parametrize("path", ["tile", "block"])
def test_a_second_backward_and_in_place_changes(path):
    """The ops keep what their backward reads with save_for_backward: with retain_graph a second backward gives the
    same gradients, without it torch refuses; an input changed in place after the forward is refused too."""
    means, covars, opac, colors = (t.float() for t in random_gaussians(100, seed=9))
    views, Ks = (t.float() for t in orbit_cameras(2, 32, 32))
    leaves = [t.clone().requires_grad_(True) for t in (means, covars, opac, colors)]
    img, alpha, _ = rasterization(*leaves, views, Ks, 32, 32, path=path, render_mode="RGB+ED")
    loss = (img * torch.randn(img.shape, generator=torch.Generator().manual_seed(3))).sum() + alpha.sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    for a, b in zip(first, second, strict=True):
        assert float(a.abs().max()) > 0 and torch.equal(a, b)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(loss, leaves)
    moved = leaves[0] * 1.0
    img, alpha, _ = rasterization(moved, *leaves[1:], views, Ks, 32, 32, path=path)
    moved.add_(0.01)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (img.sum() + alpha.sum()).backward()


def test_kernel_arguments_are_named():
    """Every launch names its arguments: a missing or unknown name is an error, not a silent shift."""
    from diffmpm_cli.kernels import splat

    from diffmpm_cli.render.ops import launch

    with pytest.raises(TypeError, match=r"missing \['tiles_y'\], unexpected \['tile_y'\]"):
        launch(splat.count_tiles, dim=1, device="cpu", means2d=None, radii=None, tiles_x=1, tile_y=1, counts_out=None)


def test_smooth_cutoffs_match_the_twin_with_the_same_cutoffs():
    """The cut-offs are kernel arguments: with check-grad's (alpha 1e-9, no transmittance stop, wider boxes) the
    kernels still equal the twin (images, alphas and box radii)."""
    cut = RasterCutoffs.smooth()
    means, covars, opac, colors = random_gaussians(150, seed=11)
    views, Ks = orbit_cameras(2, 32, 32)
    kw = dict(alpha_min=cut.alpha_min, t_stop=cut.t_stop, extend_max=cut.extend_max)
    leaves = [t.clone().requires_grad_(True) for t in (means, covars, opac, colors)]
    ref_img, ref_alpha = rasterize_ref(*leaves, views, Ks, 32, 32, **kw)
    img, alpha, meta = warp_render(*[t.float().detach().requires_grad_(True) for t in leaves], views, Ks, size=32,
                                   cutoffs=cut)
    assert float((img.double() - ref_img).abs().max()) <= 1e-4
    assert float((alpha.double() - ref_alpha).abs().max()) <= 1e-4
    _, _, ref_radii = project_ref(means, covars, opac, views, Ks, 32, 32, 0.01, 1e10, 0.3, cut.alpha_min,
                                  cut.extend_max)[1:]
    assert torch.equal(meta.radii.cpu().long(), ref_radii)


@pytest.mark.parametrize("path", ["tile", "block"])
def test_fixed_capacity_buffers_give_the_same_render_and_report_overflow(path):
    """With a fixed intersection capacity nothing is read back; a large enough one renders exactly as the sized
    buffers do, a too small one is reported by check_capacity (typed error) instead of passing silently."""
    means, covars, opac, colors = (t.float() for t in random_gaussians(200, seed=5))
    views, Ks = (t.float() for t in orbit_cameras(2, 32, 32))
    img, alpha, meta = rasterization(means, covars, opac, colors, views, Ks, 32, 32, path=path)
    n = meta.intersection_count
    fixed = rasterization(means, covars, opac, colors, views, Ks, 32, 32, path=path, capacity=n + 77)
    assert torch.equal(fixed[0], img) and torch.equal(fixed[1], alpha)
    assert isinstance(fixed[2].intersection_count, torch.Tensor) and fixed[2].check_capacity() == n
    small = rasterization(means, covars, opac, colors, views, Ks, 32, 32, path=path, capacity=n // 2)
    assert torch.isfinite(small[0]).all()
    with pytest.raises(RenderCapacityError, match=f"needed {n:,} tile intersections"):
        small[2].check_capacity()


@pytest.mark.gpu
def test_forward_and_backward_capture_as_one_cuda_graph():
    """With a fixed capacity the whole differentiable render (projection, intersections, sort, compositing, the
    hand-written and taped adjoints) is captured in one CUDA graph; replays on new input values equal eager runs."""
    from diffmpm_cli.warp_runtime import graph_capture

    device = "cuda"
    means, covars, opac, colors = (t.float().to(device) for t in random_gaussians(400, seed=6))
    views, Ks = (t.float().to(device) for t in orbit_cameras(2, 64, 64))
    leaves = [t.clone().requires_grad_(True) for t in (means, covars, opac, colors)]
    w = torch.randn(2, 64, 64, 3, device=device)

    def step():
        img, alpha, meta = rasterization(*leaves, views, Ks, 64, 64, capacity=20_000)
        grads = torch.autograd.grad((img * w).sum() + alpha.sum(), leaves)
        return img, grads, meta

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()  # warm-up: kernels compiled and loaded outside the capture
        graph = torch.cuda.CUDAGraph()
        with graph_capture(graph, stream):
            img_g, grads_g, meta_g = step()
    torch.cuda.current_stream().wait_stream(stream)
    for seed in (11, 12):
        with torch.no_grad():
            g = torch.Generator(device).manual_seed(seed)
            leaves[0].add_(0.02 * torch.randn(means.shape, device=device, generator=g))
        graph.replay()
        torch.cuda.synchronize()
        img_e, grads_e, meta_e = step()
        assert meta_g.check_capacity() == meta_e.check_capacity()
        assert torch.allclose(img_g, img_e, atol=1e-6)
        for a, b in zip(grads_g, grads_e, strict=True):  # float atomics add in a different order per run
            assert float((a - b).norm() / b.norm()) <= 1e-4


@pytest.mark.gpu
def test_bench_graph_timing_refuses_an_overflowed_capacity():
    """`bench render` times a captured render only after checking its intersection count against the capacity."""
    from diffmpm_cli.bench import _graph_time, render_scene

    inputs = render_scene(2000, 128, 128, "cuda")
    with pytest.raises(RenderCapacityError, match="tile intersections"):
        _graph_time(inputs, 128, 128, 1, capacity=16)
    assert _graph_time(inputs, 128, 128, 1, capacity=200_000) > 0
