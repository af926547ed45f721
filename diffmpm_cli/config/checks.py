"""Semantic cross-checks of a validated scene: things one field cannot know about another."""

from __future__ import annotations

import math

import numpy as np

from ..errors import AssetError, ConfigError
from ..render.camera import build_cameras, camera_location
from ..sim.grid import GridSpec
from .schema import Scene


def check_scene(scene: Scene) -> None:
    """Raise ConfigError (key path + problem) for the first inconsistency found."""
    _check_grid_numbers(scene)
    grid = GridSpec.from_sim(scene.sim)
    _check_sim(scene)
    _check_particle_mass(scene, grid)
    _check_shapes(scene, grid)
    cameras = build_cameras(scene.render, default_target=grid.center)
    _check_render(scene, grid, cameras)
    _check_target(scene, cameras)
    _check_losses(scene)


MAX_CELLS_PER_AXIS = 1 << 20  # far above any grid GridSpec accepts (512^3 nodes); keeps its arithmetic finite


def _check_grid_numbers(scene: Scene) -> None:
    """The domain's extents and the cell size are finite numbers of sane ratio (before any grid arithmetic)."""
    sim = scene.sim
    extents = [hi - lo for lo, hi in zip(sim.domain.lower, sim.domain.upper)]
    if not all(math.isfinite(e) for e in extents):
        raise ConfigError("sim.domain", "extents overflow: lower and upper must be finite and less than ~1e308 apart")
    if sim.dx is not None:
        cells = max(extents) / sim.dx
        if not cells <= MAX_CELLS_PER_AXIS:
            raise ConfigError("sim.dx", f"{sim.dx:g} m is far too small for the domain: {cells:.3g} cells along its "
                                        "longest axis (the grid may hold at most 512^3 nodes)")


def _check_particle_mass(scene: Scene, grid: GridSpec) -> None:
    """A particle's volume (spacing^3) and mass (density x volume) must be normal float32 numbers with room for sums
    and products: 1e-30..1e30."""
    spacing = grid.dx / scene.sim.particles_per_cell
    volume = spacing * spacing * spacing
    if not 1e-30 <= volume <= 1e30:
        key = "sim.dx" if scene.sim.dx is not None else "sim.domain"
        raise ConfigError(key, f"particles {spacing:.3g} m apart would have volumes of {volume:.3g} m^3, outside "
                               "1e-30..1e30, which float32 arithmetic cannot carry; use metres and a sane domain")
    mass = scene.material.density * volume
    if not 1e-30 <= mass <= 1e30:
        raise ConfigError("material.density", f"a particle of {volume:.3g} m^3 would weigh {mass:.3g} kg (density "
                                              f"{scene.material.density:g} kg/m^3): outside 1e-30..1e30, which "
                                              "float32 arithmetic cannot carry; use kg/m^3")


def _check_sim(scene: Scene) -> None:
    sim = scene.sim
    if sim.control_stride > sim.steps:
        raise ConfigError("sim.control_stride", f"must be <= sim.steps ({sim.steps}), got {sim.control_stride}")
    if sim.segment_length is not None and sim.segment_length > sim.steps:
        raise ConfigError("sim.segment_length", f"must be <= sim.steps ({sim.steps}), got {sim.segment_length}")
    for i, frame in enumerate(sim.frames):
        if frame > sim.steps:
            raise ConfigError(f"sim.frames[{i}]", f"must be <= sim.steps ({sim.steps}), got {frame}")
    with np.errstate(over="ignore"):  # the length the model divides by (numpy's norm overflows past ~1e154)
        length = float(np.linalg.norm(np.asarray(sim.floor.normal, dtype=np.float64)))
    if sim.floor.enabled and not 1e-9 <= length < math.inf:
        raise ConfigError("sim.floor.normal", f"must be a non-zero vector of finite length, got length {length:g}")


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
    from ..assets.images import read_image

    target = scene.target
    if target.mesh is None and not target.images and target.truth is None:
        raise ConfigError("target", "give a mesh, images or truth to compare the result with")
    if target.truth is not None and all(v is None for v in (target.truth.E, target.truth.nu, target.truth.v0)):
        raise ConfigError("target.truth", "gives no value: set E, nu and/or v0 (an empty truth is the source itself)")
    for i, image in enumerate(target.images):
        key = f"target.images[{i}]"
        if image.camera not in cameras.names:
            raise ConfigError(f"{key}.camera", f"no camera named '{image.camera}' (cameras: {', '.join(cameras.names)})")
        if image.frame is not None and image.frame > scene.sim.steps:
            raise ConfigError(f"{key}.frame", f"must be <= sim.steps ({scene.sim.steps}), got {image.frame}")
        if image.frame is not None and image.frame != scene.sim.steps and image.frame not in scene.sim.frames:
            raise ConfigError(f"{key}.frame", f"step {image.frame} is not kept by the rollout: add it to sim.frames")
        try:
            read_image(image.path, key=f"{key}.path", size=(scene.render.width, scene.render.height))
        except AssetError as exc:
            raise ConfigError(exc.path, exc.message) from None


def _check_losses(scene: Scene) -> None:
    loss, target = scene.loss, scene.target
    if loss.grid_mass > 0 and target.mesh is None:
        raise ConfigError("loss.grid_mass", "needs target.mesh; set the weight to 0 or give a target mesh")
    if loss.depth_l1 > 0 and target.mesh is None and target.truth is None:
        raise ConfigError("loss.depth_l1", "needs target.mesh or target.truth (images carry no depth)")
    weights = [loss.grid_mass, loss.silhouette, loss.rgb_l1, loss.dssim, loss.depth_l1]
    if not any(w > 0 for w in weights):
        raise ConfigError("loss", "every data term has weight 0: nothing would be fitted")
