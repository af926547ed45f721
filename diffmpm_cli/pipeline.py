"""The map parameters -> (images per camera and frame, states): simulation, splats, rendering.

``Pipeline.from_scene(scene, assets, device=...)`` builds everything that does not change between iterations;
``pipeline.forward(params)`` runs it differentiably for any subset of the parameter groups
(dFc, log_E, nu, v0, color, opacity_logit, log_sigma0; missing ones take the scene's values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .render.camera import build_cameras
from .render.rasterize import GSPLAT, RasterCutoffs, rasterization
from .sim.controls import control_matrices
from .sim.model import MPMModel
from .sim.op import RolloutResult, simulate
from .sim.solver import Simulator
from .splats import default_sigma0, embed_surface, particle_gaussians, surface_gaussians

# learn.<key> (also check-grad's --param names) -> the parameter group it optimises, in its parameterisation
GROUP_OF = {"dFc": "dFc", "E": "log_E", "nu": "nu", "v0": "v0", "color": "color", "opacity": "opacity_logit",
            "sigma0": "log_sigma0"}
GROUPS = tuple(GROUP_OF.values())


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
        self.sim = Simulator(self.model, mass=source.masses.to(self.device), volume=source.volumes.to(self.device))
        self.x0 = source.positions.to(self.device)
        self.start: dict[str, torch.Tensor] | None = None  # a later episode's starting state (optimize/run.py)
        appearance = scene.appearance
        self.mode = appearance.gaussians
        self.embedding = None
        if self.mode == "surface":
            self.embedding = embed_surface(source.surface_points.to(self.device), source.surface_normals.to(self.device),
                                           self.x0, neighbors=appearance.neighbors)
        cameras = build_cameras(scene.render, default_target=assets.grid.center)
        self.camera_names = cameras.names
        self.viewmats, self.Ks = cameras.to_torch(self.device)
        self.width, self.height = scene.render.width, scene.render.height
        self.cutoffs: RasterCutoffs = GSPLAT  # the gradient checker swaps in RasterCutoffs.smooth()
        self.with_depth = scene.loss.depth_l1 > 0
        self.background = torch.tensor(scene.render.background, device=self.device).expand(cameras.camera_count, 3)
        self.steps = scene.sim.steps
        self.frames = scene.sim.frames
        self.sigma0 = appearance.sigma0 or default_sigma0(mode=self.mode, surface_area=float(source.mesh.area),
                                                          samples=appearance.surface_samples, spacing=assets.spacing)

    @property
    def gaussian_count(self) -> int:
        return self.embedding.gaussian_count if self.embedding is not None else int(self.x0.shape[0])

    def initial_parameters(self, groups=GROUPS, *, seed: int | None = None) -> dict[str, torch.Tensor]:
        """Starting values of the parameter groups, from the scene (learn.*.init where given)."""
        s, learn = self.scene, self.scene.learn
        n, m, dev = int(self.x0.shape[0]), self.gaussian_count, self.device
        g = torch.Generator().manual_seed(s.optimize.seed if seed is None else seed)
        K = self.model.control_layers(self.steps)

        def sized(value, per: int | None, *shape):
            t = torch.as_tensor(value, dtype=torch.float32)
            return (t.expand(per, *shape) if per else t.reshape(shape)).clone().to(dev)

        E = learn.E.init or s.material.E
        nu = learn.nu.init if learn.nu.init is not None else s.material.nu
        v0 = learn.v0.init if learn.v0.init is not None else s.sim.initial_velocity
        color = learn.color.init or s.appearance.color
        opacity = learn.opacity.init or s.appearance.opacity
        sigma0 = learn.sigma0.init or self.sigma0
        makers = {  # built only when asked for: the random dFc alone is K x N x 9 numbers
            "dFc": lambda: (learn.dFc.init_scale * torch.randn(K, n, 3, 3, generator=g)).to(dev),
            "log_E": lambda: sized(math.log(E), n if learn.E.per_particle else None),
            "nu": lambda: sized(nu, n if learn.nu.per_particle else None),
            "v0": lambda: sized(v0, n if learn.v0.per_particle else None, 3),
            "color": lambda: sized(color, m if learn.color.per_gaussian else None, 3),
            "opacity_logit": lambda: sized(math.log(opacity / (1 - opacity)), m if learn.opacity.per_gaussian else None),
            "log_sigma0": lambda: sized(math.log(sigma0), None),
        }
        return {k: makers[k]() for k in groups}

    def simulate(self, params: dict[str, torch.Tensor]) -> RolloutResult:
        """The rollout from the rest state, or from ``self.start`` (x, v, F, C of the particles, set between
        optimisation episodes); a v0 in ``params`` replaces the carried velocity."""
        p = {**self.initial_parameters([k for k in ("log_E", "nu", "v0") if k not in params]), **params}
        start = self.start or {}
        v0 = start["v"] if start and "v0" not in params else p["v0"]
        return simulate(self.sim, x0=start.get("x", self.x0), v0=v0, E=torch.exp(p["log_E"]), nu=p["nu"],
                        steps=self.steps, Fc=self.control_matrices(p.get("dFc")), F0=start.get("F"), C0=start.get("C"),
                        frames=self.frames, segment_length=self.scene.sim.segment_length)

    def control_matrices(self, dFc: torch.Tensor | None) -> torch.Tensor | None:
        """The multiplicative controls Fc [K, N, 3, 3] (det > 0) of the learned log strains dFc (sim/controls.py)."""
        if dFc is None:
            return None
        c = self.scene.learn.dFc
        return control_matrices(dFc, max_strain=c.max_strain, max_volume_strain=c.max_volume_strain)

    def gaussians(self, x: torch.Tensor, F: torch.Tensor, params: dict[str, torch.Tensor]):
        """means [M, 3], covars [M, 3, 3], colors [M, 3], opacities [M] for one state."""
        p = {**self.initial_parameters([k for k in ("color", "opacity_logit", "log_sigma0") if k not in params]),
             **params}
        sigma0 = torch.exp(p["log_sigma0"])
        if self.embedding is not None:
            means, covars = surface_gaussians(x, F, self.embedding, sigma0=sigma0,
                                              thickness=self.scene.appearance.thickness_ratio)
        else:
            means, covars = particle_gaussians(x, F, sigma0=sigma0)
        m = means.shape[0]
        colors = p["color"].expand(m, 3)
        opacities = torch.sigmoid(p["opacity_logit"]).expand(m)
        return means, covars, colors, opacities

    def surface_points(self, x: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        """Where the source's rest surface samples [M, 3] are carried by a state (metrics; either Gaussian mode)."""
        embedding = self.embedding
        if embedding is None:
            source = self.assets.source
            embedding = self._metric_embedding = getattr(self, "_metric_embedding", None) or embed_surface(
                source.surface_points.to(self.device), source.surface_normals.to(self.device), self.x0,
                neighbors=self.scene.appearance.neighbors)
        means, _ = surface_gaussians(x, F, embedding, sigma0=torch.ones((), device=self.device), thickness=1.0)
        return means

    def render(self, means, covars, colors, opacities, *, with_depth: bool | None = None, viewmats=None, Ks=None,
               size: tuple[int, int] | None = None):
        """(images [C, H, W, 3], alphas [C, H, W, 1], expected depths [C, H, W, 1] or None) from the scene's
        cameras (or the given ones, at ``size`` = (width, height))."""
        with_depth = self.with_depth if with_depth is None else with_depth
        viewmats = self.viewmats if viewmats is None else viewmats
        Ks = self.Ks if Ks is None else Ks
        width, height = size or (self.width, self.height)
        background = self.background[:1].expand(viewmats.shape[0], 3)
        images, alphas, _ = rasterization(means, covars, opacities, colors, viewmats, Ks, width, height,
                                          near_plane=self.scene.render.near, far_plane=self.scene.render.far,
                                          backgrounds=background, render_mode="RGB+ED" if with_depth else "RGB",
                                          rasterize_mode=self.scene.render.rasterize_mode, cutoffs=self.cutoffs)
        if with_depth:
            return images[..., :3], alphas, images[..., 3:]
        return images, alphas, None

    def forward(self, params: dict[str, torch.Tensor]) -> PipelineOutput:
        result = self.simulate(params)
        images, alphas, depths = [], [], []
        for row in range(len(result.frames)):
            image, alpha, depth = self.render(*self.gaussians(result.x[row], result.F[row], params))
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
        eye = torch.eye(3, device=self.device)
        sigma0 = default_sigma0(mode="surface", surface_area=float(target.mesh.area), samples=len(points),
                                spacing=self.assets.spacing)
        rest = sigma0**2 * (eye - (1 - self.scene.appearance.thickness_ratio**2) * normals[:, :, None] * normals[:, None])
        color = self.scene.target.color or self.scene.appearance.color
        colors = torch.tensor(color, device=self.device).expand(len(points), 3)
        opacities = torch.full((len(points),), self.scene.appearance.opacity, device=self.device)
        return points, rest, colors, opacities

    def render_target(self):
        """(images [C, H, W, 3], alphas [C, H, W, 1], depths or None) of the target mesh's surface Gaussians."""
        return self.render(*self.target_gaussians())
