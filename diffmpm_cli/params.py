"""The learnable parameter groups, one row each: the single home of what a group is.

A row says how a group is named (``learn.<key>``, check-grad's ``--param``, ``summary["learned"]``; ``group``: the
tensor's name in parameter dicts, optimiser groups and checkpoints), how it is parameterised (``transform``: the
optimiser sees log E, logit opacity, log sigma0; ``natural`` and ``parameterised`` map between the two), where its
default comes from (``learn.<key>.init``, else the scene), how it is sized (one global value, or one per particle
or per Gaussian), which range a step is projected back into (``bounds``, natural units), which stage check-grad
checks it in and with which finite-difference steps. Everything else (pipeline, optimize, check-grad, outputs,
checkpoints, replay) reads this table; nothing spells a group's name, transform or range again.

As gsplat's trainer keeps one ``(name, parameter, lr)`` list and applies ``exp``/``sigmoid`` in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

E_MIN = 1.0  # Pa: the softest Young's modulus a learned E may reach
YIELD_STRESS_MIN = 1.0  # Pa
FRICTION_ANGLE_RANGE = (1.0, 80.0)  # degrees: a learned friction angle stays inside
VISCOSITY_MIN = 1.0e-6  # Pa s
HARDENING_MIN = 1.0e-3  # snow's xi
COHESION_MIN = 1.0e-3  # Pa: a learned cohesion stays above (log c cannot reach 0; 1 mPa is no cohesion at all)


@dataclass(frozen=True)
class Transform:
    """A parameterisation: ``forward`` maps the optimised value to the natural one (torch), ``inverse`` back
    (Python numbers: defaults and bounds)."""

    name: str  # "log", "logit" or "identity"
    forward: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[float], float]
    inverse_tensor: Callable[[torch.Tensor], torch.Tensor]  # ``inverse`` of a tensor (per-region values)


IDENTITY = Transform("identity", lambda t: t, lambda v: v, lambda t: t)
LOG = Transform("log", torch.exp, math.log, torch.log)
# log, where a natural value of 0 maps to -inf (exp(-inf) = 0 exactly, with zero gradient): a scene constant 0 of a
# log-parameterised group (cohesionless sand's c) passes through unchanged when the group is not learned; a learned
# group never starts there (config/checks.py refuses it)
LOG_FROM_ZERO = Transform("log", torch.exp, lambda v: math.log(v) if v > 0 else -math.inf, torch.log)
LOGIT = Transform("logit", torch.sigmoid, lambda p: math.log(p / (1 - p)), torch.logit)


@dataclass(frozen=True)
class ParamSpec:
    """One learnable parameter group (see the module docstring)."""

    key: str  # learn.<key>; check-grad --param; the name in summary["learned"]
    group: str  # the tensor's name in parameter dicts, optimiser groups and checkpoints
    transform: Transform
    stage: str  # the check-grad stage that checks it: sim, splats or render
    width: tuple[int, ...] = ()  # trailing shape of one value: () or (3,)
    per: str | None = None  # "particle" (learn.<key>.per_particle) or "gaussian" (per_gaussian): one value each
    bounds: tuple[float | None, float | None] | None = None  # natural units; a step is projected back into them
    scene_default: Callable | None = None  # (scene, pipeline) -> the natural value when learn.<key>.init is None
    fd_eps: float = 1e-2  # check-grad: step along a unit direction in the group's own parameterisation
    fd_eps_all: float | None = None  # the same for the whole-pipeline stage ("all"); None: fd_eps
    fd_eps_coordinate: float | None = None  # the same along a single coordinate; None: as along a direction
    coordinate_probes_all: bool = True  # check-grad's scene-loss stage also probes single coordinates of it
    model: tuple[str, ...] | None = None  # the material.models that have this parameter (None: every model)

    def applies_to(self, model) -> bool:
        """Whether a scene of material.model ``model`` has this group (a plastic or fluid model's own parameter
        belongs to the models that have it only)."""
        return self.model is None or model in self.model

    def natural(self, value: torch.Tensor) -> torch.Tensor:
        """The group's value in natural units (Pa, opacity in (0, 1), m, ...)."""
        return self.transform.forward(value)

    def parameterised(self, value: float) -> float:
        """A natural value in the group's own parameterisation."""
        return self.transform.inverse(value)

    def default(self, scene, pipeline=None):
        """The natural starting value: learn.<key>.init when given, else the scene's value (sigma0's needs the
        pipeline: its default follows from the sampling density)."""
        init = getattr(getattr(scene.learn, self.key), "init", None)
        return init if init is not None else self.scene_default(scene, pipeline)

    def count(self, pipeline) -> int | None:
        """How many values the group holds (particles or Gaussians), or None for one global value."""
        section = getattr(pipeline.scene.learn, self.key)
        if self.per == "particle" and section.per_particle:
            return int(pipeline.x0.shape[0])
        if self.per == "gaussian" and section.per_gaussian:
            return pipeline.gaussian_count
        return None

    def initial(self, pipeline) -> torch.Tensor:
        """The starting tensor on the pipeline's device: [count, *width] or [*width], float32; [N] where
        material.regions set the value per region (``pipeline.region_values``) and learn.<key>.init does not."""
        regional = getattr(pipeline, "region_values", {}).get(self.key)
        if regional is not None and getattr(getattr(pipeline.scene.learn, self.key), "init", None) is None:
            return self.transform.inverse_tensor(regional.double()).float().to(pipeline.device)
        t = torch.as_tensor(self.parameterised(self.default(pipeline.scene, pipeline)), dtype=torch.float32)
        per = self.count(pipeline)
        return (t.expand(per, *self.width) if per else t.reshape(self.width)).clone().to(pipeline.device)

    def project_(self, value: torch.Tensor) -> None:
        """Clamp ``value`` (in place, no grad) into ``bounds``."""
        if self.bounds is None:
            return
        low, high = (None if b is None else self.parameterised(b) for b in self.bounds)
        with torch.no_grad():
            value.clamp_(low, high) if high is not None else value.clamp_(min=low)


def _appearance(name: str):
    return lambda scene, pipeline: getattr(scene.appearance, name)


# dFc: a unit direction spreads 0.5 over all K x N x 9 log strains (~1e-3 each: the map is linear there, and the loss
# change rises above the rollout's float32 rounding, which scatters central differences at 0.1 by ~1e-2); for the
# scene loss 2.0 (~4e-3 per log strain, still in the linear range); a single coordinate of dFc is one particle's log
# strain in one layer (multiplicative, volume-preserving controls): a weak lever on the whole rollout, whose change at
# 0.1 sat within the float32 noise of the sim stage, hence 0.3. Through the rendered scene loss no single step serves:
# at 0.3 one of the 30-step snowman's probes sat in the float32 noise (6.7 % off at a derivative 1/35 of the typical),
# at 1.0 the control bound's curvature biased the torus's and the box's (35 %, 9 %): the scene loss checks dFc along
# random directions only, which move every particle's control at once.
# log E and nu: the scene's loss depends weakly on the material over a short rollout: larger steps for the "all"
# stage lift its change above the rendering's rounding noise (the loss stays close to linear over them).
PARAMS: tuple[ParamSpec, ...] = (
    # dFc has no natural default: its start is random (learn.dFc.init_scale), made by Pipeline.initial_parameters
    ParamSpec("dFc", "dFc", IDENTITY, "sim", width=(3, 3), fd_eps=0.5, fd_eps_all=2.0, fd_eps_coordinate=0.3,
              coordinate_probes_all=False),
    ParamSpec("E", "log_E", LOG, "sim", per="particle", bounds=(E_MIN, None),
              scene_default=lambda scene, _: scene.material.E, fd_eps=1e-2, fd_eps_all=1e-1),
    ParamSpec("nu", "nu", IDENTITY, "sim", per="particle", bounds=(-0.95, 0.49),
              scene_default=lambda scene, _: scene.material.nu, fd_eps=4e-3, fd_eps_all=2e-2),
    ParamSpec("v0", "v0", IDENTITY, "sim", width=(3,), per="particle",
              scene_default=lambda scene, _: scene.sim.initial_velocity, fd_eps=1e-2),
    # each plastic or fluid model's own parameter (sim/op.py material_kappa); steps as for log E (degrees for phi)
    ParamSpec("yield_stress", "log_yield_stress", LOG, "sim", per="particle", bounds=(YIELD_STRESS_MIN, None),
              scene_default=lambda scene, _: scene.material.yield_stress, fd_eps=1e-2, fd_eps_all=1e-1,
              model=("von_mises", "bingham")),
    ParamSpec("friction_angle", "friction_angle", IDENTITY, "sim", per="particle", bounds=FRICTION_ANGLE_RANGE,
              scene_default=lambda scene, _: scene.material.friction_angle, fd_eps=0.5, fd_eps_all=2.0,
              model=("drucker_prager",)),
    # cohesion c [Pa] as log c: scale-free (a 3x wrong start is one step of ln 3 whatever the units), positive; its
    # default 0 (cohesionless sand) is log c = -inf, which a learned c may not start from (config/checks.py). The loss
    # depends on c only where the sand is near the cone's apex (tension, free surfaces): larger steps than log E's
    ParamSpec("cohesion", "log_cohesion", LOG_FROM_ZERO, "sim", per="particle", bounds=(COHESION_MIN, None),
              scene_default=lambda scene, _: scene.material.cohesion, fd_eps=5e-2, fd_eps_all=2e-1,
              model=("drucker_prager",)),
    ParamSpec("viscosity", "log_viscosity", LOG, "sim", per="particle", bounds=(VISCOSITY_MIN, None),
              scene_default=lambda scene, _: scene.material.viscosity, fd_eps=1e-2, fd_eps_all=1e-1,
              model=("newtonian_fluid", "bingham")),
    ParamSpec("hardening", "log_hardening", LOG, "sim", per="particle", bounds=(HARDENING_MIN, None),
              scene_default=lambda scene, _: scene.material.hardening, fd_eps=1e-2, fd_eps_all=1e-1,
              model=("snow",)),
    ParamSpec("color", "color", IDENTITY, "render", width=(3,), per="gaussian", bounds=(0.0, 1.0),
              scene_default=_appearance("color"), fd_eps=1e-2),
    ParamSpec("opacity", "opacity_logit", LOGIT, "render", per="gaussian", scene_default=_appearance("opacity"),
              fd_eps=1e-1),
    ParamSpec("sigma0", "log_sigma0", LOG, "splats", scene_default=lambda _, pipeline: pipeline.sigma0, fd_eps=1e-2),
)
BY_KEY = {spec.key: spec for spec in PARAMS}
BY_GROUP = {spec.group: spec for spec in PARAMS}
GROUP_OF = {spec.key: spec.group for spec in PARAMS}  # learn.<key> -> group
GROUPS = tuple(BY_GROUP)
STAGES = ("sim", "splats", "render")


def natural(group: str, value: torch.Tensor) -> torch.Tensor:
    """A group's tensor in natural units (E in Pa from log E, ...)."""
    return BY_GROUP[group].natural(value)


def learned_rates(scene) -> dict[str, float]:
    """Group -> learning rate for every enabled learn.<key> section, in the table's order (the optimiser's groups)."""
    return {spec.group: getattr(scene.learn, spec.key).lr for spec in PARAMS if getattr(scene.learn, spec.key).enabled}


def reported(params: dict[str, torch.Tensor], *, max_numel: int = 3) -> dict[str, list | float]:
    """summary["learned"]: every group of at most ``max_numel`` values, in natural units under its learn.<key>."""
    return {BY_GROUP[group].key: BY_GROUP[group].natural(value.detach().cpu()).tolist()
            for group, value in params.items() if value.numel() <= max_numel}
