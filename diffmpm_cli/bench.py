"""Benchmarks (code, not tests): MPM throughput forward and forward+backward, with a per-kernel split."""

from __future__ import annotations

import resource
import statistics
import time
from datetime import datetime, timezone

import torch

from .enums import BSpline, Material, P2GMode, WallKind
from .heap import frozen_heap
from .provenance import device_name, versions
from .sim.grid import GridSpec, stable_dt
from .sim.model import MPMModel
from .sim.op import material_kappa, simulate
from .sim.solver import Simulator
from .warp_runtime import warp, warp_device

BAND = 3


def stencil_order(x, *, lower, dx: float, shift: float, block: int = 4):
    """The permutation [N] (torch int64) that puts particles x [N, 3] in order of their stencil's base node, in
    blocks of ``block``^3 bases (then base, z fastest): lanes of one warp then share a base, and P2G's and G2P's
    adjoint node adds sum them before one atomic (kernels/transfer.py). ``shift``: the B-spline's base offset in
    cells (BSPLINES). Every source makes particles in lattice order, which runs as fast (BENCHMARKS.md), so only
    ``bench mpm --stencil-order`` uses it."""
    g = torch.floor((x.double() - torch.as_tensor(lower, dtype=torch.float64, device=x.device)) / dx - shift).long()
    g = g - g.min(0).values  # >= 0
    outer = g // block
    span = int(outer.max()) + 1
    key = ((outer[:, 0] * span + outer[:, 1]) * span + outer[:, 2]) * block**3
    inner = g % block
    key = key + (inner[:, 0] * block + inner[:, 1]) * block + inner[:, 2]
    return torch.argsort(key, stable=True)


def cube_particles(count: int, grid: GridSpec, *, shuffle: bool, seed: int = 0, stencil_shift: float | None = None
                   ) -> torch.Tensor:
    """About ``count`` particles, 2 per cell per axis, in a cube at the grid's centre ([N, 3], lattice order;
    ``shuffle``: randomly permuted; then, with ``stencil_shift``, put in stencil order, sim/grid.py)."""
    side = round(count ** (1 / 3))
    spacing = grid.dx / 2
    room = (grid.shape[0] - 2 * BAND) * grid.dx
    if side * spacing >= room:
        raise ValueError(f"{side**3} particles at 2 per cell do not fit a {grid.shape[0]}^3 grid; raise --grid")
    axis = torch.arange(side, dtype=torch.float64) * spacing
    axis = axis - axis.mean() + 0.5 * grid.shape[0] * grid.dx
    x = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    if shuffle:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))]
    if stencil_shift is not None:
        x = x[stencil_order(x, lower=grid.lower, dx=grid.dx, shift=stencil_shift)]
    return x.float()


def _header(benchmark: str, device: str) -> dict:
    """The fields every benchmark record starts with: what was measured, when, on which device, with which versions."""
    name = device_name(device) + ("" if device.startswith("cuda") else " (Warp CPU backend, 1 thread)")
    return {"benchmark": benchmark, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device, "device_name": name, **versions()}


def _peak_bytes(device: str) -> int:
    """Peak device memory: Warp's memory pool plus torch's caching allocator (the rasteriser's buffers are torch
    tensors since its ops were split, so Warp's pool alone no longer sees them); on the CPU the peak resident set."""
    wp = warp()
    if device.startswith("cuda"):
        peak = int(torch.cuda.max_memory_allocated(torch.device(device)))
        if wp.is_mempool_enabled(warp_device(device)):
            peak += int(wp.get_mempool_used_mem_high(warp_device(device)))
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU: the process's peak resident set


def _timed(fn, device: str, repeats: int) -> list[float]:
    wp = warp()
    times = []
    for _ in range(repeats):
        wp.synchronize_device(warp_device(device))
        start = time.perf_counter()
        fn()
        wp.synchronize_device(warp_device(device))
        times.append(time.perf_counter() - start)
    return times


@frozen_heap()
def bench_mpm(*, particles: int = 4096, grid: int = 32, steps: int = 50, shuffle: bool = False, stencil: bool = False,
              device: str = "cpu",
              backward_steps: int | None = None, material: str = "fixed_corotated", bspline: str = "quadratic",
              repeats: int = 5, p2g: P2GMode | str | None = None, sort_every: int = 0, graphs: bool = True) -> dict:
    """Particle-steps per second of the forward step and of a checkpointed forward+backward rollout.

    Forward: ``steps`` steps without a tape, reusing one grid (the median of ``repeats`` runs), launched eagerly
    and, with ``graphs`` (plain P2G), also replayed as one captured graph (sim/graphs.py Program). Forward+backward:
    a differentiable rollout of ``backward_steps`` steps (default ``steps``) with gradients for the controls Fc and E,
    replayed from captured graphs (``graphs``, sim/graphs.py; two untimed rollouts first: eager, then the capture) or
    launched eagerly.
    Also the median time of each kernel (P2G with stress, grid update, G2P) over ``steps`` launches.
    """
    wp = warp()
    torch_device = torch.device(device)
    spec = GridSpec(lower=(0.0, 0.0, 0.0), dx=1.0 / grid, shape=(grid, grid, grid), boundary_cells=BAND)
    from .kernels.mpm import BSPLINES

    x0 = cube_particles(particles, spec, shuffle=shuffle,
                        stencil_shift=BSPLINES[BSpline(bspline)][1] if stencil else None).to(torch_device)
    n = len(x0)
    E, nu, density = 1.0e5, 0.3, 1000.0
    dt = stable_dt(E=E, nu=nu, density=density, dx=spec.dx, limit=0.4)
    model = MPMModel(grid=spec, bspline=bspline, material=material, dt=dt, gravity=(0.0, -9.81, 0.0),
                     walls_min=(WallKind.STICKY,) * 3, walls_max=(WallKind.SEPARATE,) * 3, control_stride=10)
    volume = torch.full((n,), (spec.dx / 2) ** 3, device=torch_device)
    sim = Simulator(model, mass=density * volume, volume=volume, p2g=p2g or P2GMode.PLAIN, sort_every=sort_every,
                    graphs=graphs)
    g = torch.Generator().manual_seed(1)
    v0 = (0.5 * torch.randn(n, 3, generator=g)).to(torch_device)
    eye = torch.eye(3, device=torch_device).expand(n, 3, 3).contiguous()
    mu = torch.full((n,), E / (2 * (1 + nu)), device=torch_device)
    lam = torch.full((n,), E * nu / ((1 + nu) * (1 - 2 * nu)), device=torch_device)
    # the model's third material parameter (plastic and fluid models; sim/op.py), at a representative value
    extra_name = Material(material).extra_parameter
    extra = {extra_name: torch.tensor(BENCH_EXTRA[extra_name], device=torch_device)} if extra_name else {}
    kappa = material_kappa(material, count=n, device=torch_device, **extra)
    wmu, wlam, wkappa = wp.from_torch(mu), wp.from_torch(lam), wp.from_torch(kappa.contiguous(), dtype=wp.vec3)
    fc = wp.zeros((1, n), dtype=wp.mat33, device=sim.device)  # unused: control -1
    states = [sim.new_state(), sim.new_state()]
    grid_arrays = sim.new_grid()

    def reset():
        wp.copy(states[0].x, wp.from_torch(x0, dtype=wp.vec3))
        wp.copy(states[0].v, wp.from_torch(v0, dtype=wp.vec3))
        wp.copy(states[0].F, wp.from_torch(eye, dtype=wp.mat33))
        states[0].C.zero_()

    def forward():
        a, b = states
        for _ in range(steps):
            grid_arrays.zero_()
            sim.step(a, b, grid_arrays, mu=wmu, lam=wlam, kappa=wkappa, Fc=fc, control=-1, taped=False)
            a, b = b, a

    reset()
    forward()  # warm-up: compiles and loads the kernels
    reset()
    fwd = statistics.median(_timed(forward, device, repeats))
    fwd_graphed = None
    if graphs and sim.tiled is None:  # the same steps as one captured graph, as a graphed rollout's forward runs
        from .sim.graphs import Program

        program = Program(forward, sim.device)
        program()  # eager
        program()  # the capture
        fwd_graphed = statistics.median(_timed(program, device, repeats))

    split = {}
    reset()
    for name in ("box", "sort", "p2g", "grid_update", "g2p") if sim.sort_every else ("box", "p2g", "grid_update", "g2p"):
        split[name] = statistics.median(_kernel_times(sim, name, states, grid_arrays, (wmu, wlam, wkappa), fc, device,
                                                         steps))

    T = backward_steps or steps
    K = model.control_layers(T)

    def forward_backward():
        Fc = torch.eye(3, device=torch_device).repeat(K, n, 1, 1).requires_grad_(True)
        E_t = torch.tensor(E, device=torch_device, requires_grad=True)
        out = simulate(sim, x0=x0, v0=v0, E=E_t, nu=torch.tensor(nu, device=torch_device), Fc=Fc, steps=T, **extra)
        out.x[-1].sum().backward()
        return out.stats

    stats = forward_backward()  # warm-up: kernels load (and with graphs, the programs run eagerly)
    forward_backward()  # with graphs: the capture
    fwd_bwd = statistics.median(_timed(forward_backward, device, repeats))
    return {
        **_header("mpm", device),
        "particles": n,
        "grid": grid,
        "steps": steps,
        "shuffled": shuffle,
        "stencil_order": stencil,
        "material": material,
        "bspline": bspline,
        "p2g": sim.p2g_mode,
        "sort_every": sim.sort_every,
        "graphs": graphs,
        "forward_s_per_step": fwd / steps,
        "forward_particle_steps_per_s": n * steps / fwd,
        "forward_graphed_s_per_step": fwd_graphed / steps if fwd_graphed else None,
        "forward_graphed_particle_steps_per_s": n * steps / fwd_graphed if fwd_graphed else None,
        "kernel_s_per_step": split,  # median of single launches
        "backward_steps": T,
        "forward_backward_s": fwd_bwd,
        "forward_backward_particle_steps_per_s": n * T / fwd_bwd,
        "segments": stats.segments,
        "taped_bytes_per_step": stats.bytes_per_step,
        "peak_taped_bytes": stats.peak_taped_bytes,
        "peak_bytes": _peak_bytes(device),
        "clamped_particle_steps": stats.clamped_particle_steps,
    }


BENCH_EXTRA = {"yield_stress": 2.0e3, "friction_angle": 30.0, "viscosity": 1.0}  # Pa, degrees, Pa s


def _step_launches(sim, state_in, state_out, grid, *, mu, lam, kappa, Fc) -> list[tuple[str, object]]:
    """The launches of one untaped step without controls, in order, as (name, launch) pairs: what
    ``Simulator.step(..., taped=False)`` runs, taken apart so that each kernel can be timed alone."""
    from .sim import launch

    out = [("box", lambda: launch.particle_box(sim.model, state_in, grid, device=sim.device))]
    if sim.tiled is not None:
        if sim.tiled.sort_due():
            out.append(("sort", lambda: sim.tiled.sort(state_in)))
        out.append(("p2g", lambda: sim.tiled.p2g(state_in, grid, mu=mu, lam=lam, kappa=kappa, Fc=Fc,
                                                                control=-1)))
    else:
        out.append(("p2g", lambda: launch.p2g(sim.model, sim.particles, state_in, grid, mu=mu, lam=lam,
                                              kappa=kappa, Fc=Fc, control=-1)))
    out.append(("grid_update", lambda: launch.grid_update(sim.model, grid, node_mass_eps=sim.node_mass_eps,
                                                          device=sim.device)))
    out.append(("g2p", lambda: launch.g2p(sim.model, state_in, grid, state_out, mu=mu, lam=lam, kappa=kappa,
                                          Fc=Fc, control=-1,
                                          clamped=sim.clamped, J_min=sim.J_min, device=sim.device)))
    return out


def _kernel_times(sim, name, states, grid, material, fc, device, steps) -> list[float]:
    """Time one kernel of the step ``steps`` times in a row (the others run untimed in between)."""
    a, b = states
    times = []
    for _ in range(steps):
        grid.zero_()
        mu, lam, kappa = material
        for label, launch in _step_launches(sim, a, b, grid, mu=mu, lam=lam, kappa=kappa, Fc=fc):
            if label == name:
                times += _timed(launch, device, 1)
            else:
                launch()
        a, b = b, a
    return times


# ----------------------------------------------------------------------------------------------------------------
# renderer


def render_scene(gaussians: int, width: int, height: int, device: str, seed: int = 0):
    """Gaussians in front of one camera (a few off-screen and behind it) and the camera: means, covars, opacities,
    colors, viewmats, Ks on ``device`` in float32."""
    from .reference.splat import orbit_cameras
    from .render.rasterize import covars_from_quats_scales

    g = torch.Generator().manual_seed(seed)
    means = torch.randn(gaussians, 3, generator=g) * 0.4
    scales = torch.exp(torch.randn(gaussians, 3, generator=g) * 0.4 - 4.8)
    covars = covars_from_quats_scales(torch.randn(gaussians, 4, generator=g), scales)
    opacities = torch.rand(gaussians, generator=g)
    colors = torch.rand(gaussians, 3, generator=g)
    views, Ks = orbit_cameras(1, width, height, dtype=torch.float32)
    return [t.to(device) for t in (means, covars, opacities, colors, views, Ks)]


def _ours(means, covars, opacities, colors, views, Ks, width, height, **kw):
    img, alpha, meta = _ours_meta(means, covars, opacities, colors, views, Ks, width, height, **kw)
    return img, alpha, meta.intersection_count


def _ours_meta(means, covars, opacities, colors, views, Ks, width, height, **kw):
    from .render.rasterize import rasterization

    return rasterization(means, covars, opacities, colors, views, Ks, width, height,
                         backgrounds=torch.ones(1, 3, device=means.device), **kw)


def _gsplat(means, covars, opacities, colors, views, Ks, width, height, rasterize_mode: str = "classic"):
    import gsplat

    img, alpha, meta = gsplat.rasterization(means, None, None, opacities, colors, views, Ks, width, height,
                                            covars=covars, packed=False, backgrounds=torch.ones(1, 3, device=means.device),
                                            rasterize_mode=rasterize_mode)
    return img, alpha, int(meta["flatten_ids"].numel())


def _graph_time(inputs, width, height, repeats, capacity: int) -> float:
    """Median seconds of one replay of forward + backward captured as a single CUDA graph (fixed capacity).

    RenderCapacityError if the render needs more than ``capacity`` intersections (a replay of an overflowed render
    would time an incomplete image)."""
    from .warp_runtime import graph_capture

    leaves = [t.clone().requires_grad_(True) for t in inputs[:4]]

    def step():
        img, alpha, meta = _ours_meta(*leaves, *inputs[4:], width, height, capacity=capacity)
        return torch.autograd.grad(img.sum() + alpha.sum(), leaves), meta

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
        graph = torch.cuda.CUDAGraph()
        with graph_capture(graph, stream):
            _, meta = step()
    graph.replay()
    torch.cuda.synchronize()
    meta.check_capacity()  # the count the captured render wrote, read after a replay
    times = []
    for rep in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        if rep >= 2:
            times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)


def _fwd_bwd_times(render, inputs, width, height, repeats):
    """Median forward and backward seconds of one renderer (CUDA events around each)."""
    leaves = [t.clone().requires_grad_(True) for t in inputs[:4]]
    fwd, bwd = [], []
    for rep in range(repeats + 2):
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize() if leaves[0].is_cuda else None
        t0 = time.perf_counter()
        img, alpha, _ = render(*leaves, *inputs[4:], width, height)
        torch.cuda.synchronize() if leaves[0].is_cuda else None
        t1 = time.perf_counter()
        (img.sum() + alpha.sum()).backward()
        torch.cuda.synchronize() if leaves[0].is_cuda else None
        t2 = time.perf_counter()
        if rep >= 2:  # the first two runs warm up (compilation, allocator)
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return statistics.median(fwd), statistics.median(bwd)


@frozen_heap()
def bench_render(*, gaussians: int = 3000, width: int = 128, height: int = 128, device: str = "cpu",
                 compare_gsplat: bool = False, repeats: int = 5) -> dict:
    """Forward and backward time of the rasteriser (RGB, one camera); with gsplat timed on the same tensors."""
    inputs = render_scene(gaussians, width, height, device)
    fwd, bwd = _fwd_bwd_times(_ours, inputs, width, height, repeats)
    _, _, isects = _ours(*inputs, width, height)
    result = {
        **_header("render", device),
        "gaussians": gaussians, "width": width, "height": height, "intersections": isects,
        "forward_s": fwd, "backward_s": bwd, "peak_bytes": _peak_bytes(device),
    }
    if device.startswith("cuda"):
        capacity = int(isects * 1.25) + 1024
        result.update(graph_capacity=capacity,
                      graph_forward_backward_s=_graph_time(inputs, width, height, repeats, capacity))
    if compare_gsplat:
        import gsplat

        g_fwd, g_bwd = _fwd_bwd_times(_gsplat, inputs, width, height, repeats)
        result.update(gsplat=gsplat.__version__, gsplat_forward_s=g_fwd, gsplat_backward_s=g_bwd,
                      ratio_forward=fwd / g_fwd, ratio_backward=bwd / g_bwd,
                      ratio_forward_backward=(fwd + bwd) / (g_fwd + g_bwd))
    return result


def compare_with_gsplat(*, gaussians: int = 100_000, width: int = 1024, height: int = 1024, device: str = "cuda",
                        seed: int = 0, rasterize_mode: str = "classic") -> dict:
    """Images, alphas, gradients and intersection counts of ours vs gsplat on the same tensors (either mode)."""
    inputs = render_scene(gaussians, width, height, device, seed=seed)
    out = {}
    g = torch.Generator(device=device).manual_seed(seed)
    v_img = torch.randn(1, height, width, 3, generator=g, device=device)
    v_alpha = torch.randn(1, height, width, 1, generator=g, device=device)
    for name, render in (("ours", _ours), ("gsplat", _gsplat)):
        leaves = [t.clone().requires_grad_(True) for t in inputs[:4]]
        img, alpha, isects = render(*leaves, *inputs[4:], width, height, rasterize_mode=rasterize_mode)
        ((img * v_img).sum() + (alpha * v_alpha).sum()).backward()
        grads = [t.grad for t in leaves]
        grads[1] = 0.5 * (grads[1] + grads[1].transpose(1, 2))  # the symmetric part of the covariance gradient
        out[name] = (img.detach(), alpha.detach(), isects, grads)
    (i1, a1, n1, g1), (i2, a2, n2, g2) = out["ours"], out["gsplat"]
    names = ("means", "covars", "opacities", "colors")
    pixel_err = torch.maximum((i1 - i2).abs().amax(-1), (a1 - a2).abs()[..., 0])
    return {
        "gaussians": gaussians, "width": width, "height": height,
        "image_max_abs": float((i1 - i2).abs().max()), "alpha_max_abs": float((a1 - a2).abs().max()),
        "pixels_over_1e-3": int((pixel_err > 1e-3).sum()), "pixels_over_1e-4": int((pixel_err > 1e-4).sum()),
        "pixels": pixel_err.numel(),
        "intersections": {"ours": n1, "gsplat": n2},
        "grad_rel_l2": {k: float((a - b).norm() / b.norm().clamp_min(1e-30)) for k, a, b in zip(names, g1, g2, strict=True)},
    }


# ----------------------------------------------------------------------------------------------------------------
# one optimisation iteration, split by stage


@frozen_heap()
def bench_optimize(*, scene, assets, device: str = "cpu", repeats: int = 5, graphs: bool = True) -> dict:
    """Median seconds per stage of one optimisation iteration of ``scene`` (its learned groups, its loss).

    ``graphs``: rollouts replay captured graphs (sim/graphs.py), as in ``diffmpm optimize``, or launch eagerly. The
    first two iterations are not timed (warm-up; with graphs, the eager run and the capture).

    The iteration is cut at every stage boundary (states -> Gaussians -> images -> loss) by detached leaves, and
    each backward is run on its own from the gradients the next stage handed back, so the split is exact:
    sim forward/backward, splats forward/backward, render forward/backward, losses forward/backward.
    """
    from .losses import scene_loss
    from .optimize.run import Optimization

    run = Optimization(scene, assets, device=device)
    pipe, params = run.pipeline, run.params
    pipe.sim.graphs = graphs
    wp = warp()
    sync = lambda: wp.synchronize_device(warp_device(device))  # noqa: E731
    stages = ("sim_forward", "splats_forward", "render_forward", "loss_forward", "loss_backward", "render_backward",
              "splats_backward", "sim_backward")
    samples = {k: [] for k in (*stages, "iteration")}

    def clock(name, fn):
        sync()
        start = time.perf_counter()
        value = fn()
        sync()
        samples[name].append(time.perf_counter() - start)
        return value

    def leaf(t):
        return t.detach().requires_grad_(True)

    def iteration():
        for v in params.values():
            v.grad = None
        result = clock("sim_forward", lambda: pipe.simulate(params))
        xs, Fs = leaf(result.x), leaf(result.F)
        gaussians = clock("splats_forward", lambda: [pipe.gaussians(xs[r], Fs[r], params) for r in range(len(xs))])
        g_leaves = [[leaf(t) for t in g] for g in gaussians]
        rendered = clock("render_forward", lambda: [pipe.render(*g) for g in g_leaves])
        images = leaf(torch.stack([r[0] for r in rendered]))
        alphas = leaf(torch.stack([r[1] for r in rendered]))
        depths = leaf(torch.stack([r[2] for r in rendered])) if pipe.with_depth else None
        from .pipeline import PipelineOutput

        output = PipelineOutput(images=images, alphas=alphas, result=result.__class__(
            x=xs, v=result.v, F=Fs, C=result.C, frames=result.frames, stats=result.stats), depths=depths)
        total = clock("loss_forward", lambda: scene_loss(pipe, output, params, targets=run.targets)[0])
        clock("loss_backward", lambda: total.backward())
        outs, grads = [], []
        for r, rend in enumerate(rendered):
            for t, g in ((rend[0], images.grad), (rend[1], alphas.grad), (rend[2], None if depths is None else
                                                                            depths.grad)):
                if t is not None and g is not None:
                    outs.append(t)
                    grads.append(g[r])
        clock("render_backward", lambda: torch.autograd.backward(outs, grads))
        outs, grads = [], []
        for g_out, g_leaf in zip(gaussians, g_leaves):
            for t, lf in zip(g_out, g_leaf):
                if lf.grad is not None and t.requires_grad:
                    outs.append(t)
                    grads.append(lf.grad)
        clock("splats_backward", lambda: torch.autograd.backward(outs, grads) if outs else None)
        outs = [t for t, lf in ((result.x, xs), (result.F, Fs)) if lf.grad is not None]
        grads = [lf.grad for lf in (xs, Fs) if lf.grad is not None]
        clock("sim_backward", lambda: torch.autograd.backward(outs, grads) if outs and outs[0].requires_grad else None)

        return result

    for repeat in range(repeats + 2):  # the first rounds compile, warm up and capture
        result = iteration()
        samples["iteration"].append(sum(samples[k][-1] for k in stages))
        if repeat < 2:
            for k in samples:
                samples[k].clear()
    return {
        **_header("optimize", device), "scene": scene.name, "particles": int(pipe.x0.shape[0]),
        "gaussians": pipe.gaussian_count, "grid": list(assets.grid.shape), "steps": scene.sim.steps,
        "cameras": int(pipe.viewmats.shape[0]), "size": [pipe.width, pipe.height], "frames": len(result.frames),
        "repeats": repeats, "graphs": graphs, "seconds": {k: statistics.median(v) for k, v in samples.items()},
        "peak_bytes": _peak_bytes(device),
    }
