"""The map parameters -> (images per camera and frame, states): simulation, splats, rendering.

``Pipeline(scene, assets, device=...)`` builds everything that does not change between iterations;
``pipeline.forward(params, start=..., frames=..., cutoffs=...)`` runs it differentiably for any subset of the
parameter groups (params.py: dFc, log_E, nu, v0, color, opacity_logit, log_sigma0; missing ones take the scene's
values). The pipeline holds no state that varies between calls: an episode's starting state, the kept frames and
the raster cut-offs are arguments, so no caller ever saves, changes and restores an attribute.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .assets import region_model_codes, region_values
from .config.sequences import rollout_steps
from .enums import LEARNABLE_MODEL_PARAMETERS
from .params import BY_GROUP, GROUP_OF, GROUPS, natural
from .render.camera import build_cameras
from .render.rasterize import GSPLAT, RasterCutoffs, rasterization
from .sim.controls import control_matrices
from .sim.model import MPMModel
from .sim.op import RolloutResult, simulate
from .sim.solver import Simulator
from .splats import (
    default_sigma0,
    embed_surface,
    embedding_deformation,
    rest_covariances,
    splat_gaussians,
    surface_gaussians,
    view_colors,
)

__all__ = ["GROUP_OF", "GROUPS", "Pipeline", "PipelineOutput"]


@dataclass
class PipelineOutput:
    """images [R, C, H, W, 3], alphas [R, C, H, W, 1] (and expected depths [R, C, H, W, 1] m when the scene's loss
    uses depth) for the frames ``result.frames``, and the rollout."""

    images: torch.Tensor
    alphas: torch.Tensor
    result: RolloutResult
    depths: torch.Tensor | None = None


class Pipeline:
    def __init__(self, scene, assets, *, device: str = "cpu"):
        self.scene, self.assets = scene, assets
        self.device = torch.device(device)
        source = assets.source
        self.model = MPMModel.from_scene(scene, assets.grid)
        codes = region_model_codes(scene, source.region, self.model.models)  # several models: each particle's
        self.sim = Simulator(self.model, mass=source.masses.to(self.device), volume=source.volumes.to(self.device),
                             model_code=codes.to(self.device) if codes is not None else None)
        self.x0 = source.positions.to(self.device)
        # material.regions: key -> [N] natural values of E, nu and the models' parameters that regions set
        self.region_values = {key: value.to(self.device) for key, value in region_values(
            scene, source.region, ("E", "nu", *self.model_parameters)).items()}
        appearance = scene.appearance
        self.mode = appearance.gaussians
        self.embedding = None
        if self.mode == "surface":
            self.embedding = embed_surface(source.surface_points.to(self.device), source.surface_normals.to(self.device),
                                           self.x0, neighbors=appearance.neighbors)
        self.splats = source.splats  # a trained 3DGS source: its own shapes, colours, opacities and SH
        if self.splats is not None:
            self.embedding.rest_covars = torch.as_tensor(self.splats.covars, dtype=torch.float32, device=self.device)
            self.sh_rest = torch.as_tensor(self.splats.sh_rest, dtype=torch.float32, device=self.device)
            self.sh_frame = torch.as_tensor(self.splats.frame, dtype=torch.float32, device=self.device)
        cameras = build_cameras(scene.render, default_target=assets.grid.center)
        self.camera_names = cameras.names
        self.viewmats, self.Ks = cameras.to_torch(self.device)
        self.width, self.height = scene.render.width, scene.render.height
        self.with_depth = scene.loss.depth_l1 > 0
        self.background = torch.tensor(scene.render.background, device=self.device).expand(cameras.camera_count, 3)
        self.steps = scene.sim.steps
        # the steps a rollout keeps unless forward/simulate are given others: sim.frames and the target sequences
        self.frames = rollout_steps(scene)
        self.thickness = appearance.thickness_ratio
        self.sigma0 = appearance.sigma0 if appearance.sigma0 is not None else default_sigma0(
            mode=self.mode, surface_area=float(source.mesh.area), samples=appearance.surface_samples,
            spacing=assets.spacing)
        if self.splats is not None and appearance.sigma0 is None:
            self.sigma0 = 1.0  # a factor on the trained Gaussians' sizes
        self.target_color = scene.target.color if scene.target.color is not None else appearance.color

    @property
    def material_parameter(self) -> str | None:
        """The learn.<key> of the scene's models' first learnable parameter (yield_stress, friction_angle,
        viscosity, hardening; drucker_prager's cohesion comes second) or None (elastic models)."""
        learnable = self.material_parameters
        return learnable[0] if learnable else None

    @property
    def model_parameters(self) -> tuple[str, ...]:
        """Every parameter beside E and nu of the scene's models (material.model and the regions'), each once."""
        return tuple(dict.fromkeys(name for m in self.model.models for name in m.parameters))

    @property
    def material_parameters(self) -> tuple[str, ...]:
        """The learn.<key>s of the scene's models' learnable parameters (bingham has two: yield_stress and
        viscosity; drucker_prager two: friction_angle and cohesion); they join E and nu in every rollout (a
        cohesion of 0, not learned, as exp(-inf) = 0: params.py LOG_FROM_ZERO). The models' other parameters (snow's
        critical compression and stretch, bingham's flow index) are the scene's constants."""
        return tuple(name for name in self.model_parameters if name in LEARNABLE_MODEL_PARAMETERS)

    def applies(self, group: str) -> bool:
        """Whether parameter group ``group`` belongs to this scene (a model parameter: to one of its models)."""
        return any(BY_GROUP[group].applies_to(m) for m in self.model.models)

    @property
    def gaussian_count(self) -> int:
        return self.embedding.gaussian_count if self.embedding is not None else int(self.x0.shape[0])

    def initial_parameters(self, groups=GROUPS, *, seed: int | None = None) -> dict[str, torch.Tensor]:
        """Starting values of the parameter groups, from the scene (learn.*.init where given; params.py). Another
        material model's parameter (yield_stress, friction_angle, viscosity) is not this scene's: it is left out."""
        out = {}
        for group in groups:
            if not self.applies(group):
                continue
            if group == "dFc":  # random (learn.dFc.init_scale), built only when asked for: K x N x 9 numbers
                s, n = self.scene, int(self.x0.shape[0])
                g = torch.Generator().manual_seed(s.optimize.seed if seed is None else seed)
                K = self.model.control_layers(self.steps)
                out[group] = (s.learn.dFc.init_scale * torch.randn(K, n, 3, 3, generator=g)).to(self.device)
            elif self.splats is not None and group in ("color", "opacity_logit"):  # the trained values
                trained = self.splats.colors if group == "color" else self.splats.opacities
                value = torch.as_tensor(trained, dtype=torch.float32)
                out[group] = (value.clamp(0, 1) if group == "color" else torch.logit(value.clamp(1e-6, 1 - 1e-6)))\
                    .to(self.device)
            else:
                out[group] = BY_GROUP[group].initial(self)
        return out

    def _with_defaults(self, params: dict[str, torch.Tensor], groups) -> dict[str, torch.Tensor]:
        return {**self.initial_parameters([k for k in groups if k not in params]), **params}

    def simulate(self, params: dict[str, torch.Tensor], *, start: dict[str, torch.Tensor] | None = None,
                 frames=None, frozen=None) -> RolloutResult:
        """The rollout from the rest state, or from ``start`` (x, v, F, C of the particles: a later optimisation
        episode's start); a v0 in ``params`` replaces the carried velocity. ``frames``: the steps to keep (default
        sim.frames; the final step always). ``frozen``: branch decisions kept across rollouts
        (``sim.solver.FrozenDecisions``)."""
        learnable = self.material_parameters
        p = self._with_defaults(params, ("log_E", "nu", "v0", *(GROUP_OF[key] for key in learnable)))
        start = start or {}
        v0 = start["v"] if start and "v0" not in params else p["v0"]
        material = {key: natural(GROUP_OF[key], p[GROUP_OF[key]]) for key in learnable}
        material.update({key: self.region_values[key] if key in self.region_values
                         else torch.tensor(float(getattr(self.scene.material, key)), device=self.device)
                         for key in self.model_parameters if key not in learnable
                         and (key in self.region_values or getattr(self.scene.material, key) is not None)})
        return simulate(self.sim, x0=start.get("x", self.x0), v0=v0, E=natural("log_E", p["log_E"]), nu=p["nu"],
                        **material,
                        steps=self.steps, Fc=self.control_matrices(p.get("dFc")), F0=start.get("F"), C0=start.get("C"),
                        Jp0=start.get("Jp"),
                        frames=self.frames if frames is None else frames,
                        segment_length=self.scene.sim.segment_length, frozen=frozen)

    def control_matrices(self, dFc: torch.Tensor | None) -> torch.Tensor | None:
        """The multiplicative controls Fc [K, N, 3, 3] (det > 0) of the learned log strains dFc (sim/controls.py)."""
        if dFc is None:
            return None
        c = self.scene.learn.dFc
        return control_matrices(dFc, max_strain=c.max_strain, max_volume_strain=c.max_volume_strain)

    def gaussians(self, x: torch.Tensor, F: torch.Tensor, params: dict[str, torch.Tensor], *, viewmats=None):
        """means [M, 3], covars [M, 3, 3], colors [M, 3], opacities [M] for one state; colors [C, M, 3] per camera
        of ``viewmats`` [C, 4, 4] when the source is a trained 3DGS scene with view-dependent (SH degree >= 1)
        colours (without viewmats: their degree-0 colours)."""
        p = self._with_defaults(params, ("color", "opacity_logit", "log_sigma0"))
        means, covars = splat_gaussians(x, F, self.embedding, sigma0=natural("log_sigma0", p["log_sigma0"]),
                                        thickness=self.thickness)
        m = means.shape[0]
        colors = p["color"].expand(m, 3)
        if viewmats is not None and self.splats is not None and self.splats.degree > 0:
            colors = view_colors(colors, self.sh_rest, means=means, Fbar=embedding_deformation(F, self.embedding),
                                 viewmats=viewmats, frame=self.sh_frame)
        opacities = natural("opacity_logit", p["opacity_logit"]).expand(m)
        return means, covars, colors, opacities

    @torch.no_grad()
    def render_views(self, x: torch.Tensor, F: torch.Tensor, params: dict[str, torch.Tensor], *, viewmats, Ks,
                     size: tuple[int, int], chunk: int = 8) -> torch.Tensor:
        """RGB images [C, H, W, 3] of one state from cameras ``viewmats`` [C, 4, 4] / ``Ks`` [C, 3, 3] at ``size``
        (width, height), ``chunk`` views at a time: a trained 3DGS source's view-dependent colours are evaluated per
        view, so each chunk holds [chunk, M, 3] colours."""
        images = []
        for start in range(0, viewmats.shape[0], chunk):
            views, intrinsics = viewmats[start:start + chunk], Ks[start:start + chunk]
            gaussians = self.gaussians(x, F, params, viewmats=views)
            images.append(self.render(*gaussians, with_depth=False, viewmats=views, Ks=intrinsics, size=size)[0])
        return torch.cat(images)

    @functools.cached_property
    def metric_embedding(self):
        """The source's rest surface samples bound to the particles: the Gaussians' own embedding in surface mode,
        built on first use in particle mode (only metrics need it there)."""
        if self.embedding is not None:
            return self.embedding
        source = self.assets.source
        return embed_surface(source.surface_points.to(self.device), source.surface_normals.to(self.device), self.x0,
                             neighbors=self.scene.appearance.neighbors)

    def surface_points(self, x: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        """Where the source's rest surface samples [M, 3] are carried by a state (metrics; either Gaussian mode)."""
        means, _ = surface_gaussians(x, F, self.metric_embedding, sigma0=torch.ones((), device=self.device),
                                     thickness=1.0)
        return means

    def render(self, means, covars, colors, opacities, *, with_depth: bool | None = None, viewmats=None, Ks=None,
               size: tuple[int, int] | None = None, cutoffs: RasterCutoffs | None = None):
        """(images [C, H, W, 3], alphas [C, H, W, 1], expected depths [C, H, W, 1] or None) from the scene's
        cameras (or the given ones, at ``size`` = (width, height)); ``cutoffs``: gsplat's unless given (the gradient
        checker renders with RasterCutoffs.smooth())."""
        with_depth = self.with_depth if with_depth is None else with_depth
        viewmats = self.viewmats if viewmats is None else viewmats
        Ks = self.Ks if Ks is None else Ks
        width, height = size or (self.width, self.height)
        background = self.background[:1].expand(viewmats.shape[0], 3)
        images, alphas, _ = rasterization(means, covars, opacities, colors, viewmats, Ks, width, height,
                                          near_plane=self.scene.render.near, far_plane=self.scene.render.far,
                                          backgrounds=background, render_mode="RGB+ED" if with_depth else "RGB",
                                          rasterize_mode=self.scene.render.rasterize_mode,
                                          cutoffs=GSPLAT if cutoffs is None else cutoffs)
        if with_depth:
            return images[..., :3], alphas, images[..., 3:]
        return images, alphas, None

    def forward(self, params: dict[str, torch.Tensor], *, start: dict[str, torch.Tensor] | None = None,
                frames=None, cutoffs: RasterCutoffs | None = None, frozen=None) -> PipelineOutput:
        """Simulate (from ``start``, keeping ``frames``, with ``frozen`` decisions; see ``simulate``), splat and
        render (with ``cutoffs``)."""
        result = self.simulate(params, start=start, frames=frames, frozen=frozen)
        images, alphas, depths = [], [], []
        for row in range(len(result.frames)):
            image, alpha, depth = self.render(*self.gaussians(result.x[row], result.F[row], params,
                                                              viewmats=self.viewmats), cutoffs=cutoffs)
            images.append(image)
            alphas.append(alpha)
            depths.append(depth)
        return PipelineOutput(images=torch.stack(images), alphas=torch.stack(alphas), result=result,
                              depths=torch.stack(depths) if self.with_depth else None)

    def target_gaussians(self):
        """means, covars, colors, opacities of the target mesh's surface Gaussians (rest, no physics)."""
        target = self.assets.target
        if target is None:
            raise ValueError("the scene has no target mesh")
        points = target.surface_points.to(self.device)
        normals = target.surface_normals.to(self.device)
        sigma0 = default_sigma0(mode="surface", surface_area=float(target.mesh.area), samples=len(points),
                                spacing=self.assets.spacing)
        rest = rest_covariances(normals, sigma0=sigma0, thickness=self.thickness)
        colors = torch.tensor(self.target_color, device=self.device).expand(len(points), 3)
        opacities = torch.full((len(points),), self.scene.appearance.opacity, device=self.device)
        return points, rest, colors, opacities

    def render_target(self, *, cutoffs: RasterCutoffs | None = None):
        """(images [C, H, W, 3], alphas [C, H, W, 1], depths or None) of the target mesh's surface Gaussians."""
        return self.render(*self.target_gaussians(), cutoffs=cutoffs)
