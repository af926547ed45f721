"""Autodiff vs central finite differences along random directions (the routine behind tests and `check-grad`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Probe:
    """One directional derivative: autodiff grad . u against (L(theta + eps u) - L(theta - eps u)) / (2 eps)."""

    parameter: str
    direction: str  # "random" or "coordinate <i>"
    ad: float
    fd: float
    eps: float

    @property
    def rel_error(self) -> float:
        scale = max(abs(self.ad), abs(self.fd), 1e-12)
        return abs(self.ad - self.fd) / scale


def directional_probes(loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], params: dict[str, torch.Tensor], *,
                       eps: dict[str, float], probes: int = 3, coordinates: int = 0, seed: int = 0) -> list[Probe]:
    """Compare d loss / d param along ``probes`` random unit directions (and ``coordinates`` single entries).

    ``loss_fn`` maps a dict of parameter tensors to a scalar. It is evaluated once with autograd and twice per
    probe without; ``eps[name]`` is the step along the unit direction.
    """
    generator = torch.Generator().manual_seed(seed)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss = loss_fn(leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    results = []
    for (name, value), grad in zip(leaves.items(), grads, strict=True):
        grad = torch.zeros_like(value) if grad is None else grad
        directions = []
        for _ in range(probes):
            u = torch.randn(value.shape, generator=generator, dtype=value.dtype)
            directions.append(("random", u / u.norm()))
        for _ in range(coordinates):
            i = int(torch.randint(value.numel(), (1,), generator=generator))
            u = torch.zeros(value.numel(), dtype=value.dtype)
            u[i] = 1.0
            directions.append((f"coordinate {i}", u.reshape(value.shape)))
        for label, u in directions:
            u = u.to(value.device)
            h = eps[name]
            with torch.no_grad():
                plus = float(loss_fn({**leaves, name: value.detach() + h * u}))
                minus = float(loss_fn({**leaves, name: value.detach() - h * u}))
            results.append(Probe(parameter=name, direction=label, ad=float((grad * u).sum()),
                                 fd=(plus - minus) / (2 * h), eps=h))
    return results


# ----------------------------------------------------------------------------------------------------------------
# stages of the pipeline (diffmpm check-grad)

STAGES = ("sim", "splats", "render", "all")
GROUP_NAMES = {"dFc": "dFc", "E": "log_E", "nu": "nu", "v0": "v0", "color": "color", "opacity": "opacity_logit",
               "sigma0": "log_sigma0"}
STAGE_GROUPS = {"sim": ("dFc", "E", "nu", "v0"), "splats": ("sigma0",), "render": ("color", "opacity"),
                "all": tuple(GROUP_NAMES)}
# steps along a unit direction, in each group's own parameterisation (log E, logit opacity, log sigma0)
DEFAULT_EPS = {"dFc": 0.1, "log_E": 1e-2, "nu": 4e-3, "v0": 1e-2, "color": 1e-2, "opacity_logit": 1e-2,
               "log_sigma0": 1e-2}
RELATIVE_EPS = 1e-2  # stage inputs (x, F, means, covars): step = this x their RMS value


@dataclass(frozen=True)
class CheckRow:
    stage: str
    parameter: str
    probes: int
    worst_rel_error: float
    ad: float
    fd: float
    passed: bool


def _random_weights(tensors, generator):
    return [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device) for t in tensors]


def _weighted(tensors, weights):
    return sum((t.double() * w).sum() for t, w in zip(tensors, weights, strict=True))


def stage_problem(pipeline, stage: str, groups, *, seed: int):
    """(loss_fn, params, eps) for one stage: a scalar made from random weights over the stage's outputs (``all``:
    the scene's own loss), as a function of the selected parameter groups and the stage's inputs."""
    from .losses import scene_loss
    from .splats import particle_gaussians, surface_gaussians

    g = torch.Generator().manual_seed(seed)
    chosen = [GROUP_NAMES[k] for k in groups if k in STAGE_GROUPS[stage]]
    params = pipeline.initial_parameters(chosen)
    if "dFc" in params:  # probe around a deformed state, not the trivial zero control
        params["dFc"] = params["dFc"] + 0.01 * torch.randn(params["dFc"].shape, generator=g).to(params["dFc"].device)
    eps = {k: DEFAULT_EPS[k] for k in params}
    with torch.no_grad():
        rest = pipeline.forward(pipeline.initial_parameters(["dFc"]) if stage != "sim" else {}).result
    x, F = rest.x[-1], rest.F[-1]
    if stage == "sim":
        with torch.no_grad():
            out = pipeline.simulate(params)
        weights = _random_weights([out.x, out.v, out.F, out.C], g)

        def loss(p):
            r = pipeline.simulate(p)
            return _weighted([r.x, r.v, r.F, r.C], weights)
    elif stage == "splats":
        # pure torch: checked in float64, where central differences resolve what float32 rounding would hide
        params.update(x=x.double(), F=(F + 0.05 * torch.randn(F.shape, generator=g).to(F.device)).double())
        params["log_sigma0"] = params.get("log_sigma0", pipeline.initial_parameters(["log_sigma0"])["log_sigma0"])
        params["log_sigma0"] = params["log_sigma0"].double()
        embedding = pipeline.embedding.to(torch.float64) if pipeline.embedding is not None else None
        thickness = pipeline.scene.appearance.thickness_ratio

        def gaussians(p):
            sigma0 = torch.exp(p["log_sigma0"])
            if embedding is not None:
                return surface_gaussians(p["x"], p["F"], embedding, sigma0=sigma0, thickness=thickness)
            return particle_gaussians(p["x"], p["F"], sigma0=sigma0)

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
            image, alpha = pipeline.render(means, covars, colors, opacities)
        weights = _random_weights([image, alpha], g)

        def loss(p):
            _, _, colors, opacities = pipeline.gaussians(x, F, p)
            covs = 0.5 * (p["covars"] + p["covars"].transpose(1, 2))
            image, alpha = pipeline.render(p["means"], covs, colors, opacities)
            return _weighted([image, alpha], weights)
    elif stage == "all":
        target = pipeline.render_target()[1] if pipeline.assets.target is not None else None

        def loss(p):
            return scene_loss(pipeline, pipeline.forward(p), p, target_alphas=target)
    else:
        raise ValueError(f"unknown stage {stage!r}")
    for name in ("x", "F", "means", "covars"):
        if name in params:
            eps[name] = RELATIVE_EPS * float(params[name].double().pow(2).mean().sqrt())
    return loss, params, eps


def check_stages(pipeline, *, stages, groups, probes: int = 8, coordinates: int = 2, rtol: float = 1e-2,
                 eps_scale: float = 1.0, seed: int = 0) -> list[CheckRow]:
    """One row per (stage, parameter): the worst relative error over its probes and whether it is within rtol."""
    rows = []
    for stage in stages:
        loss, params, eps = stage_problem(pipeline, stage, groups, seed=seed)
        if not params:
            continue
        results = directional_probes(loss, params, eps={k: v * eps_scale for k, v in eps.items()}, probes=probes,
                                     coordinates=coordinates, seed=seed)
        for name in params:
            mine = [p for p in results if p.parameter == name]
            scale = max(max(abs(p.ad) for p in mine), 1e-30)
            # a probe whose derivative is tiny next to this parameter's others is judged against that scale
            errors = [abs(p.ad - p.fd) / max(abs(p.ad), abs(p.fd), 1e-2 * scale) for p in mine]
            worst = max(range(len(mine)), key=lambda i: errors[i])
            rows.append(CheckRow(stage=stage, parameter=name, probes=len(mine), worst_rel_error=errors[worst],
                                 ad=mine[worst].ad, fd=mine[worst].fd, passed=errors[worst] <= rtol))
    return rows
