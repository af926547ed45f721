"""Semantic cross-checks of a validated scene: things one field cannot know about another."""

from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import AssetError, ConfigError
from ..render.camera import build_cameras, camera_location
from ..sim.grid import GridSpec
from .schema import Scene


def check_scene(scene: Scene) -> None:
    """Raise ConfigError (key path + problem) for the first inconsistency found."""
    grid = GridSpec.from_sim(scene.sim)
    _check_sim(scene)
    _check_shapes(scene, grid)
    cameras = build_cameras(scene.render, default_target=grid.center)
    _check_render(scene, grid, cameras)
    _check_target(scene, cameras)
    _check_losses(scene)


def _check_sim(scene: Scene) -> None:
    sim = scene.sim
    if sim.control_stride > sim.steps:
        raise ConfigError("sim.control_stride", f"must be <= sim.steps ({sim.steps}), got {sim.control_stride}")
    if sim.segment_length is not None and sim.segment_length > sim.steps:
        raise ConfigError("sim.segment_length", f"must be <= sim.steps ({sim.steps}), got {sim.segment_length}")
    for i, frame in enumerate(sim.frames):
        if frame > sim.steps:
            raise ConfigError(f"sim.frames[{i}]", f"must be <= sim.steps ({sim.steps}), got {frame}")
    if sim.floor.enabled and np.linalg.norm(sim.floor.normal) < 1e-9:
        raise ConfigError("sim.floor.normal", "must be a non-zero vector")


def _check_shapes(scene: Scene, grid: GridSpec) -> None:
    from ..assets import build_mesh, check_inside

    roots = [("source", scene.source)] + ([("target.mesh", scene.target.mesh)] if scene.target.mesh else [])
    for key, shape in roots:
        try:
            mesh = build_mesh(shape, key=key, default_center=grid.center)
            check_inside(mesh.bounds, grid, key)
        except AssetError as exc:
            raise ConfigError(exc.path, exc.message) from exc
        floor = scene.sim.floor
        if floor.enabled and key == "source":
            normal = np.asarray(floor.normal) / np.linalg.norm(floor.normal)
            lowest = float(np.min(mesh.vertices @ normal))
            if lowest < floor.height:
                raise ConfigError(key, f"reaches below the floor plane (height {floor.height:g} m along the normal; "
                                       f"the shape goes down to {lowest:.4g} m)")


def _check_render(scene: Scene, grid: GridSpec, cameras) -> None:
    render = scene.render
    if render.near >= render.far:
        raise ConfigError("render.near", f"must be < render.far ({render.far:g}), got {render.near:g}")
    pixels, depths = cameras.project(np.asarray([grid.center]))
    for c, name in enumerate(cameras.names):
        (u, v), depth = pixels[c, 0], depths[c, 0]
        where = camera_location(c, render)
        if not render.near < depth < render.far:
            raise ConfigError(where, f"camera '{name}' does not look at the domain: its centre is at depth "
                                     f"{depth:.3g} m, outside near..far = {render.near:g}..{render.far:g} m")
        if not (0.0 <= u <= render.width and 0.0 <= v <= render.height):
            raise ConfigError(where, f"camera '{name}' does not look at the domain: its centre projects to pixel "
                                     f"({u:.1f}, {v:.1f}), outside the {render.width}x{render.height} image")


def _check_target(scene: Scene, cameras) -> None:
    target = scene.target
    if target.mesh is None and not target.images and target.truth is None:
        raise ConfigError("target", "give a mesh, images or truth to compare the result with")
    for i, image in enumerate(target.images):
        key = f"target.images[{i}]"
        if image.camera not in cameras.names:
            raise ConfigError(f"{key}.camera", f"no camera named '{image.camera}' (cameras: {', '.join(cameras.names)})")
        if image.frame is not None and image.frame > scene.sim.steps:
            raise ConfigError(f"{key}.frame", f"must be <= sim.steps ({scene.sim.steps}), got {image.frame}")
        if image.frame is not None and image.frame != scene.sim.steps and image.frame not in scene.sim.frames:
            raise ConfigError(f"{key}.frame", f"step {image.frame} is not kept by the rollout: add it to sim.frames")
        try:
            with Image.open(image.path) as img:
                size = img.size
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ConfigError(f"{key}.path", f"not a readable image: {image.path} ({exc})") from exc
        if size != (scene.render.width, scene.render.height):
            raise ConfigError(f"{key}.path", f"image is {size[0]}x{size[1]} px but render is "
                                             f"{scene.render.width}x{scene.render.height}")


def _check_losses(scene: Scene) -> None:
    loss, target = scene.loss, scene.target
    if loss.grid_mass > 0 and target.mesh is None:
        raise ConfigError("loss.grid_mass", "needs target.mesh; set the weight to 0 or give a target mesh")
    if loss.depth_l1 > 0 and target.mesh is None and target.truth is None:
        raise ConfigError("loss.depth_l1", "needs target.mesh or target.truth (images carry no depth)")
    weights = [loss.grid_mass, loss.silhouette, loss.rgb_l1, loss.dssim, loss.depth_l1]
    if not any(w > 0 for w in weights):
        raise ConfigError("loss", "every data term has weight 0: nothing would be fitted")
