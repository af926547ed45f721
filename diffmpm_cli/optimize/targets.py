"""What a run is compared with: target images (and alphas, depths) per kept frame and camera.

Three sources, in this order of precedence: the scene's target images (PNG/JPEG per camera and frame), a
ground truth (``target.truth``: the source simulated with the true material / velocity and rendered at every
kept frame), or the target mesh (its own surface Gaussians rendered at the final step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..assets.images import load_picture
from ..assets.sequences import sequence_pictures
from ..config.sequences import rollout_steps
from ..errors import ConfigError
from ..params import BY_KEY
from ..sim.grid import kept_frames


@dataclass
class TargetFrame:
    """Targets at one kept step: row into the rollout's frames; images [C, H, W, 3], alphas [C, H, W, 1],
    depths [C, H, W, 1] m or None; ``cameras`` [C] bool: which cameras have a target at this step."""

    step: int
    row: int
    images: torch.Tensor
    alphas: torch.Tensor
    depths: torch.Tensor | None
    cameras: torch.Tensor


@dataclass
class Targets:
    frames: list[TargetFrame]
    kind: str  # "images", "truth" or "mesh"

    @property
    def final(self) -> TargetFrame:
        return self.frames[-1]


def rollout_frames(scene) -> list[int]:
    """The steps a rollout of ``scene`` keeps, sorted: sim.frames, the target sequences' steps and the final step."""
    return kept_frames(scene.sim.steps, rollout_steps(scene))


def build_targets(pipeline, *, cutoffs=None) -> Targets:
    """The scene's targets; what is rendered (truth, the target's Gaussians) is rendered with ``cutoffs``."""
    scene = pipeline.scene
    frames = rollout_frames(scene)
    if scene.target.images or scene.target.sequences:
        return _image_targets(pipeline, frames)
    if scene.target.truth is not None:
        return _truth_targets(pipeline, frames, cutoffs=cutoffs)
    with torch.no_grad():
        if scene.target.mesh_render == "exact":  # the target's Gaussians only for depths, when a loss needs them
            images, alphas = exact_mesh_pictures(pipeline)
            depths = pipeline.render_target(cutoffs=cutoffs)[2] if pipeline.with_depth else None
        else:
            images, alphas, depths = pipeline.render_target(cutoffs=cutoffs)
    cams = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
    return Targets([TargetFrame(scene.sim.steps, len(frames) - 1, images, alphas, depths, cams)], kind="mesh")


SUPERSAMPLE = 4  # per axis: exact target silhouettes are averaged over 4 x 4 sub-pixels


def exact_mesh_pictures(pipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [C, H, W, 3], alphas [C, H, W, 1]) of the exact target mesh from the scene's cameras: the coverage of
    its triangles (4 x 4 supersampled, so edges are fractional as rendered ones are) in the target's colour over
    the background."""
    from ..render.mesh_raster import mesh_silhouettes

    mesh, scene, s = pipeline.assets.target.mesh, pipeline.scene, SUPERSAMPLE
    Ks = pipeline.Ks.detach().double().clone()
    Ks[:, :2, :] *= s  # the same cameras at s times the resolution (pixel centres stay consistent)
    fine = mesh_silhouettes(mesh.vertices, mesh.faces, pipeline.viewmats.detach(), Ks, pipeline.width * s,
                            pipeline.height * s, device=pipeline.device)
    C = fine.shape[0]
    alphas = fine.float().reshape(C, pipeline.height, s, pipeline.width, s).mean(dim=(2, 4))[..., None]
    color = torch.tensor(pipeline.target_color, device=pipeline.device)
    background = torch.tensor(scene.render.background, device=pipeline.device)
    return alphas * color + (1 - alphas) * background, alphas


def truth_parameters(pipeline) -> dict[str, torch.Tensor]:
    """The scene's material / velocity with target.truth's values put in (the others as in the scene)."""
    truth = pipeline.scene.target.truth
    keys = ("E", "nu", "v0", *pipeline.material_parameters)
    params = pipeline.initial_parameters([BY_KEY[key].group for key in keys])
    for key in keys:
        value, spec = getattr(truth, key), BY_KEY[key]
        if value is not None:
            params[spec.group] = torch.tensor(spec.parameterised(value), dtype=params[spec.group].dtype,
                                              device=pipeline.device).expand_as(params[spec.group]).clone()
    return params


def _truth_targets(pipeline, frames, *, cutoffs=None) -> Targets:
    with torch.no_grad():
        out = pipeline.forward(truth_parameters(pipeline), cutoffs=cutoffs)
    cams = torch.ones(out.images.shape[1], dtype=torch.bool, device=out.images.device)
    return Targets([TargetFrame(step, row, out.images[row], out.alphas[row],
                                None if out.depths is None else out.depths[row], cams)
                    for row, step in enumerate(frames)], kind="truth")


def load_target_image(path: str, *, background, key: str = "target.images", size: tuple[int, int] | None = None,
                      mask: str | None = None, tolerance: float = 2.0 / 255.0) -> tuple[np.ndarray, np.ndarray]:
    """(rgb [H, W, 3], alpha [H, W, 1]) in [0, 1] at ``size`` (width, height; None = the picture's own): alpha from
    ``mask``, else the image's alpha channel, else pixels within ``tolerance`` of ``background`` are transparent,
    else the whole image is opaque (assets/images.py load_picture)."""
    return load_picture(path, key=key, size=size, mask=mask, mask_key=key.replace(".path", ".mask"),
                        background=background, tolerance=tolerance)


def target_picture(scene, index: int) -> tuple[np.ndarray, np.ndarray]:
    """target.images[index] at the render size: (rgb [H, W, 3], alpha [H, W, 1])."""
    spec, target = scene.target.images[index], scene.target
    return load_picture(spec.path, key=f"target.images[{index}].path", size=(scene.render.width, scene.render.height),
                        mask=spec.mask, mask_key=f"target.images[{index}].mask", background=target.image_background,
                        tolerance=target.image_background_tolerance, backdrop=scene.render.background)


def _image_targets(pipeline, frames) -> Targets:
    scene = pipeline.scene
    names = list(pipeline.camera_names)
    C, H, W = len(names), scene.render.height, scene.render.width
    by_step: dict[int, TargetFrame] = {}

    def put(step: int, camera: str, rgb: np.ndarray, alpha: np.ndarray) -> None:
        frame = by_step.get(step)
        if frame is None:
            dev = pipeline.device
            frame = by_step[step] = TargetFrame(step, frames.index(step), torch.zeros(C, H, W, 3, device=dev),
                                                torch.zeros(C, H, W, 1, device=dev), None,
                                                torch.zeros(C, dtype=torch.bool, device=dev))
        c = names.index(camera)
        frame.images[c] = torch.from_numpy(rgb)
        frame.alphas[c] = torch.from_numpy(alpha)
        frame.cameras[c] = True

    for i, spec in enumerate(scene.target.images):
        step = scene.sim.steps if spec.frame is None else spec.frame
        if step not in frames:
            raise ConfigError(f"target.images[{i}].frame", f"step {step} is not kept by the rollout: add it to sim.frames")
        if spec.camera not in names:
            raise ConfigError(f"target.images[{i}].camera", f"no camera named '{spec.camera}'")
        put(step, spec.camera, *target_picture(scene, i))
    for i, spec in enumerate(scene.target.sequences):
        if spec.camera not in names:
            raise ConfigError(f"target.sequences[{i}].camera", f"no camera named '{spec.camera}'")
        for step, rgb, alpha in sequence_pictures(scene, i):
            put(step, spec.camera, rgb, alpha)
    return Targets([by_step[s] for s in sorted(by_step)], kind="images")
