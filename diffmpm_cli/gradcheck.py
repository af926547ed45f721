"""Autodiff vs central finite differences along random directions (the routine behind tests and `check-grad`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .params import BY_KEY, PARAMS

MAX_HALVINGS = 6  # of a finite-difference step whose central differences at h and 2h disagree
RICHARDSON_NOISE = (16 + 0.25) ** 0.5 / 3  # noise of (4 D(h) - D(2h)) / 3 relative to that of D(h)
# a D(h) + b D(1.5h) + c D(2h) with a + b + c = 0 and a + 2.25 b + 4 c = 0: zero on D(s) = g + k s^2, so what it leaves
# of three central differences is their noise; with independent noise of each D(s) ~ 1/s its standard deviation is
# FIT_RESIDUAL_NOISE times that of D(h)
FIT_RESIDUAL = (-7 / 12, 1.0, -5 / 12)
FIT_RESIDUAL_NOISE = (FIT_RESIDUAL[0] ** 2 + (FIT_RESIDUAL[1] / 1.5) ** 2 + (FIT_RESIDUAL[2] / 2) ** 2) ** 0.5


@dataclass(frozen=True)
class Probe:
    """One directional derivative: autodiff grad . u against central differences of L along u.

    fd is Richardson's extrapolation (4 D(eps) - D(2 eps)) / 3 of D(h) = (L(theta + h u) - L(theta - h u)) / 2h.
    """

    parameter: str
    direction: str  # "random" or "coordinate <i>"
    ad: float
    fd: float
    eps: float
    noise: float = 0.0  # estimated standard deviation of fd from the loss's own rounding noise

    @property
    def rel_error(self) -> float:
        scale = max(abs(self.ad), abs(self.fd), 1e-12)
        return abs(self.ad - self.fd) / scale


def directional_probes(loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], params: dict[str, torch.Tensor], *,
                       eps: dict[str, float], probes: int = 3, coordinates: int = 0, seed: int = 0,
                       coordinate_eps: dict[str, float] | None = None, noise_samples: int = 3) -> list[Probe]:
    """Compare d loss / d param along ``probes`` random unit directions (and ``coordinates`` single entries).

    ``loss_fn`` maps a dict of parameter tensors to a scalar. It is evaluated once with autograd and six times
    per probe without (two more per halving of a step over which the loss is far from quadratic); ``eps[name]``
    is the step along a random unit direction, ``coordinate_eps[name]`` (default: the same) along a single
    coordinate.

    The loss's rounding noise (float32 kernels) is measured, not assumed: ``noise_samples`` tiny joint steps
    (1e-2 of every eps) whose change is predicted to first order by the autodiff gradient; what remains is noise,
    and ``Probe.noise`` is the standard deviation it gives each central difference.
    """
    generator = torch.Generator().manual_seed(seed)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss = loss_fn(leaves)
    if loss.requires_grad:
        grads = [torch.zeros_like(v) if g is None else g
                 for v, g in zip(leaves.values(), torch.autograd.grad(loss, list(leaves.values()), allow_unused=True))]
    else:  # the loss does not depend on any of them (e.g. a scene without loss terms)
        grads = [torch.zeros_like(v) for v in leaves.values()]
    noise = _loss_noise(loss_fn, leaves, grads, eps, generator, noise_samples)
    results = []
    for (name, value), grad in zip(leaves.items(), grads, strict=True):
        directions = []
        for _ in range(probes):
            u = torch.randn(value.shape, generator=generator, dtype=value.dtype)
            directions.append(("random", u / u.norm()))
        # a None step: no single-coordinate probes for this parameter (stage_problem: dFc in the scene loss)
        for _ in range(coordinates if (coordinate_eps or {}).get(name, 0.0) is not None else 0):
            i = int(torch.randint(value.numel(), (1,), generator=generator))
            u = torch.zeros(value.numel(), dtype=value.dtype)
            u[i] = 1.0
            directions.append((f"coordinate {i}", u.reshape(value.shape)))
        mine = []
        for label, u in directions:
            u = u.to(value.device)
            h = eps[name] if label == "random" else (coordinate_eps or eps).get(name, eps[name])
            with torch.no_grad():
                def central(step, name=name, value=value.detach(), u=u):
                    plus = float(loss_fn({**leaves, name: value + step * u}))
                    minus = float(loss_fn({**leaves, name: value - step * u}))
                    return (plus - minus) / (2 * step)

                # Richardson: (4 D(h) - D(2h)) / 3 cancels the h^2 error of the central difference D(h). Where
                # D(h) and D(2h) disagree by more than their noise and 0.5 %, the loss is far from quadratic over the
                # step (a stiff rollout with impacts): halve the step until the extrapolated value settles (its
                # change below 0.2 % and its noise), up to MAX_HALVINGS times.
                d1, d15, d2 = central(h), central(1.5 * h), central(2 * h)
                # D(h), D(1.5h), D(2h) of a loss smooth over the step lie on g + k s^2; what this combination (zero
                # on any such line) leaves is the noise of central differences at the probe's own step
                misfit = FIT_RESIDUAL[0] * d1 + FIT_RESIDUAL[1] * d15 + FIT_RESIDUAL[2] * d2
                fd, halved = (4 * d1 - d2) / 3, False
                if abs(d1 - d2) > 0.005 * max(abs(d1), abs(d2)) + 6 * noise / (2**0.5 * h):
                    halved = True
                    for _ in range(MAX_HALVINGS):
                        h, d2 = h / 2, d1
                        d1 = central(h)
                        settled = (4 * d1 - d2) / 3
                        done = abs(settled - fd) <= 0.002 * abs(settled) + 3 * RICHARDSON_NOISE * noise / (2**0.5 * h)
                        fd = settled
                        if done:
                            break
            # the misfit in loss units (noise of one evaluation), comparable across steps; none from a halved probe
            # (there the loss is not smooth over the first step, and the misfit is its curvature, not noise)
            mine.append((label, u, fd, h, None if halved else abs(misfit) * 2**0.5 * h / FIT_RESIDUAL_NOISE))
        # The noise at the probes' own steps: the float32 loss's rounding is not white noise. Measured at tiny steps
        # (_loss_noise) it can be several times smaller than at the finite-difference step (peanut_to_sphere's
        # sim/dFc: 1e-3 against an error of the loss that wanders by a few 1e-3 over steps of 0.03-0.5 along a
        # probe, from the final C's ~1e-4 relative float32 error; a float64 twin of the rollout gave AD = FD to
        # 1e-6 there). The larger of the two estimates counts, the misfits pooled over the parameter's probes.
        misfits = [m for *_, m in mine if m is not None]
        pooled = (sum(m * m for m in misfits) / len(misfits)) ** 0.5 if misfits else 0.0
        for label, u, fd, h, _ in mine:
            noise_fd = max(noise, pooled) / (2**0.5 * h) * RICHARDSON_NOISE
            results.append(Probe(parameter=name, direction=label, ad=float((grad * u).sum()), fd=fd, eps=h,
                                 noise=noise_fd))
    return results


def _loss_noise(loss_fn, leaves, grads, eps, generator, samples: int) -> float:
    """RMS of L(theta + d) - L(theta) - grad . d over small random joint steps d: the loss's rounding noise."""
    if samples <= 0:
        return 0.0
    with torch.no_grad():
        base = float(loss_fn(leaves))
        residuals = []
        for _ in range(samples):
            step, linear = {}, 0.0
            for (name, value), grad in zip(leaves.items(), grads, strict=True):
                u = torch.randn(value.shape, generator=generator, dtype=value.dtype).to(value.device)
                d = 1e-2 * eps[name] * u / u.norm()
                step[name] = value.detach() + d
                linear += float((grad * d).sum())
            residuals.append(float(loss_fn(step)) - base - linear)
    return (sum(r * r for r in residuals) / samples) ** 0.5


# ----------------------------------------------------------------------------------------------------------------
# stages of the pipeline (diffmpm check-grad)

STAGES = ("sim", "splats", "render", "all")
# a group's stage and its finite-difference steps live in its row of params.py
STAGE_GROUPS = {**{stage: tuple(spec.key for spec in PARAMS if spec.stage == stage) for stage in STAGES[:3]},
                "all": tuple(BY_KEY)}
# Stage inputs: x and F (float64 splats stage) step 1e-2 x their RMS value along a unit direction. The rendered
# means and covariances are judged through float32 images whose rounding (~1e-5 in a loss over ~1e5 pixels) must
# stay far below the change: along a random direction each entry moves (RMS) 0.02 of a Gaussian's standard deviation
# (means) or of the covariances' RMS value (covars), so the whole step is sqrt(numel) times that; a single
# coordinate moves 0.1 of the same scale. Both keep the loss close to linear over the step.
# Covariances move 10x less: surface discs are 0.1 sigma0 thick (a thin variance ~0.03 of the RMS entry), and steps
# of 0.02 per entry pushed flat discs across the antialiasing compensation's sqrt(det) kink (bunny: AD 3606, FD 4112).
INPUT_STEP = {"means": (0.02, 0.1), "covars": (0.002, 0.01)}
RELATIVE_EPS = {"x": 1e-2, "F": 1e-2}


NOISE_SIGMAS = 3.0


@dataclass(frozen=True)
class CheckRow:
    stage: str
    parameter: str
    probes: int
    worst_rel_error: float
    ad: float
    fd: float
    noise: float  # the worst probe's finite-difference noise, relative like worst_rel_error
    passed: bool


def _random_weights(tensors, generator):
    return [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device) for t in tensors]


def _weighted(tensors, weights):
    return sum((t.double() * w).sum() for t, w in zip(tensors, weights, strict=True))


CLAMP_WINDOW_SHARE = 0.25  # random control log strains of at most this share of snow's narrowest clamp bound


def _control_scale_limit(pipeline) -> float:
    """The largest standard deviation of the random control log strains that keeps a snow body's controlled F inside
    its clamp window [1 - theta_c, 1 + theta_s] at the control step (inf for every other model).

    Snow's clamp sets each singular value beyond a bound onto it, so the next steps' F_trial has singular values
    within dt |C| of each other and of the bound (one above, one below): there its return mapping changes its
    derivative by O(1) within a few 1e-4 of F (the divided difference (g_i - g_j) / (s_i - s_j) of the clamp runs from
    0 to 1 across the gap), and a central difference of the true clamp over any larger step measures a chord, not the
    gradient (docs/MATERIALS.md). Controls of 0.01 put nearly every particle of the preset's snow (theta_s = 7.5e-3)
    there. The probes now linearise the clamp at the base rollout's F_trial (FrozenDecisions), which removes the chord
    wherever the clamp acts (an impact's compaction too: tests/test_snow_linearised.py); the window is kept all the
    same (snowball_impact's full check was measured with it, not without)."""
    from .enums import Material

    if Material.SNOW not in pipeline.model.models:
        return float("inf")
    bounds = []
    for key in ("critical_compression", "critical_stretch"):
        value = pipeline.region_values.get(key)
        bounds.append(float(value.min()) if value is not None else float(getattr(pipeline.scene.material, key)))
    return CLAMP_WINDOW_SHARE * min(bounds)


def stage_problem(pipeline, stage: str, groups, *, seed: int, cutoffs=None):
    """(loss_fn, params, eps, coordinate_eps) for one stage: a scalar made from random weights over the stage's
    outputs (``all``: the scene's own loss), as a function of the selected parameter groups and the stage's inputs.
    Everything is rendered with ``cutoffs`` (check_stages: RasterCutoffs.smooth())."""
    from .losses import frozen_l1_signs, scene_loss
    from .optimize.targets import build_targets
    from .sim.solver import FrozenDecisions
    from .splats import splat_gaussians

    g = torch.Generator().manual_seed(seed)
    # another material model's parameter is not this scene's (check-grad's default list names every model's)
    specs = [BY_KEY[k] for k in groups if k in STAGE_GROUPS[stage] and pipeline.applies(BY_KEY[k].group)]
    params = pipeline.initial_parameters([spec.group for spec in specs])
    # a log-parameterised value of 0 (cohesionless sand's log c = -inf: no step moves it, nothing to probe) is left out
    specs = [spec for spec in specs if bool(torch.isfinite(params[spec.group]).all())]
    params = {spec.group: params[spec.group] for spec in specs}
    if "dFc" in params:  # probe around a deformed state, not the trivial zero control: random log strains of 0.01,
        # 0.1 for the scene loss (volume-preserving controls of 0.01 barely move the body, and the loss then hardly
        # depends on E or nu). Open: at 0.1 the sim stage's AD and FD differed by 4-5 % (snowman dFc, bunny log E).
        scale = min(0.1 if stage == "all" else 0.01, _control_scale_limit(pipeline))
        params["dFc"] = params["dFc"] + scale * torch.randn(params["dFc"].shape, generator=g).to(params["dFc"].device)
    eps = {spec.group: spec.fd_eps_all if stage == "all" and spec.fd_eps_all is not None else spec.fd_eps
           for spec in specs}
    coordinate_eps = {spec.group: spec.fd_eps_coordinate for spec in specs if spec.fd_eps_coordinate is not None}
    with torch.no_grad():
        rest = pipeline.forward(pipeline.initial_parameters(["dFc"]) if stage != "sim" else {},
                                cutoffs=cutoffs).result
    x, F = rest.x[-1], rest.F[-1]
    # contact and yield branches of the base rollout, replayed by every other one (snow's clamp linearised at the
    # base's F_trial: FrozenDecisions(linearise=True))
    frozen = FrozenDecisions()
    if stage == "sim":
        with torch.no_grad():
            out = pipeline.simulate(params, frozen=frozen)
        weights = _random_weights([out.x, out.v, out.F, out.C], g)

        def loss(p):
            r = pipeline.simulate(p, frozen=frozen)
            return _weighted([r.x, r.v, r.F, r.C], weights)
    elif stage == "splats":
        # pure torch: checked in float64, where central differences resolve what float32 rounding would hide
        params.update(x=x.double(), F=(F + 0.05 * torch.randn(F.shape, generator=g).to(F.device)).double())
        params["log_sigma0"] = params.get("log_sigma0", pipeline.initial_parameters(["log_sigma0"])["log_sigma0"])
        params["log_sigma0"] = params["log_sigma0"].double()
        embedding = pipeline.embedding.to(torch.float64) if pipeline.embedding is not None else None

        def gaussians(p):
            return splat_gaussians(p["x"], p["F"], embedding, sigma0=BY_KEY["sigma0"].natural(p["log_sigma0"]),
                                   thickness=pipeline.thickness)

        with torch.no_grad():
            weights = _random_weights(gaussians(params), g)

        def loss(p):
            return _weighted(gaussians(p), weights)
    elif stage == "render":
        with torch.no_grad():
            means, covars, _, _ = pipeline.gaussians(x, F, {})
        params.update(means=means, covars=covars)
        with torch.no_grad():
            _, _, colors, opacities = pipeline.gaussians(x, F, params)
            image, alpha, _ = pipeline.render(means, covars, colors, opacities, with_depth=False, cutoffs=cutoffs)
        weights = _random_weights([image, alpha], g)

        def loss(p):
            _, _, colors, opacities = pipeline.gaussians(x, F, p)
            covs = 0.5 * (p["covars"] + p["covars"].transpose(1, 2))
            image, alpha, _ = pipeline.render(p["means"], covs, colors, opacities, with_depth=False, cutoffs=cutoffs)
            return _weighted([image, alpha], weights)
    elif stage == "all":
        targets = build_targets(pipeline, cutoffs=cutoffs)
        # L1 terms have a kink wherever a residual crosses zero; with continuous images (smooth cut-offs) tails
        # of rendered and target alphas cross everywhere near the silhouette, and a central difference straddling
        # those kinks errs in proportion to its step. The signs are frozen at theta: the same loss value and
        # gradient there, the kinks' choice taken as autodiff takes it.
        with torch.no_grad():
            signs = frozen_l1_signs(pipeline, pipeline.forward(params, cutoffs=cutoffs, frozen=frozen), targets)

        def loss(p):
            return scene_loss(pipeline, pipeline.forward(p, cutoffs=cutoffs, frozen=frozen), p, targets=targets,
                              l1_signs=signs)[0]
    else:
        raise ValueError(f"unknown stage {stage!r}")
    for name, factor in RELATIVE_EPS.items():
        if name in params:
            eps[name] = factor * float(params[name].double().pow(2).mean().sqrt())
    coordinate_eps = {**eps, **coordinate_eps}
    if stage == "render":
        scale = {"means": float(params["covars"].diagonal(dim1=1, dim2=2).double().mean().sqrt()),
                 "covars": float(params["covars"].double().pow(2).mean().sqrt())}
        for name, (per_entry, single) in INPUT_STEP.items():
            eps[name] = per_entry * scale[name] * params[name].numel() ** 0.5
            coordinate_eps[name] = single * scale[name]
    if stage == "all":  # single coordinates too weak to see through a rendered loss: random directions only
        coordinate_eps.update({spec.group: None for spec in specs if not spec.coordinate_probes_all})
    return loss, params, eps, coordinate_eps


def check_stages(pipeline, *, stages, groups, probes: int = 8, coordinates: int = 2, rtol: float = 1e-2,
                 eps_scale: float = 1.0, seed: int = 0) -> list[CheckRow]:
    """One row per (stage, parameter): the worst relative error over its probes and whether it is within rtol.

    Everything renders with the cut-offs moved where their jumps vanish (RasterCutoffs.smooth): at gsplat's cut-offs
    a Gaussian crossing alpha = 1/255 at one pixel changes a loss by ~1/255 at once, which a central difference
    divides by 2 eps, so no step size makes it converge. With the cut-offs at 1e-9 the same kernels (forward and
    hand-written backward) render a continuous image, and the comparison is meaningful."""
    from .render.rasterize import RasterCutoffs

    smooth = RasterCutoffs.smooth()
    rows = []
    for stage in stages:
        loss, params, eps, coordinate_eps = stage_problem(pipeline, stage, groups, seed=seed, cutoffs=smooth)
        if not params:
            continue
        single = {k: None if v is None else v * eps_scale for k, v in coordinate_eps.items()}
        results = directional_probes(loss, params, eps={k: v * eps_scale for k, v in eps.items()},
                                     coordinate_eps=single, probes=probes, coordinates=coordinates, seed=seed)
        for name in params:
            mine = [p for p in results if p.parameter == name]
            # a probe nearly orthogonal to the gradient (its derivative far below this parameter's typical one)
            # is judged against a tenth of the typical value, not against its own near-zero
            typical = max(sum(p.ad**2 for p in mine) / len(mine), 1e-60) ** 0.5
            scales = [max(abs(p.ad), abs(p.fd), 0.1 * typical, 1e-300) for p in mine]
            # a probe passes when |AD - FD| <= rtol x its scale + 3 standard deviations of the FD's measured noise
            allowance = [rtol * sc + NOISE_SIGMAS * p.noise for p, sc in zip(mine, scales)]
            worst = max(range(len(mine)), key=lambda i: abs(mine[i].ad - mine[i].fd) / allowance[i])
            p = mine[worst]
            rows.append(CheckRow(stage=stage, parameter=name, probes=len(mine),
                                 worst_rel_error=abs(p.ad - p.fd) / scales[worst], ad=p.ad, fd=p.fd,
                                 noise=NOISE_SIGMAS * p.noise / scales[worst],
                                 passed=abs(p.ad - p.fd) <= allowance[worst]))
    return rows
