"""Semantic cross-checks of a validated scene: things one field cannot know about another.

Values only: nothing here builds a mesh, a camera or a grid. Geometry is checked where it is built (shapes,
particles, cameras and target pictures by ``assets.build_assets``), with the same key paths in its errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..enums import BSpline, Material
from ..errors import ConfigError
from .schema import Scene
from .sequences import sequence_steps

DEFAULT_RESOLUTION = 32
# the wall band a particle's transfer stencil needs (cells) per B-spline order
MIN_BOUNDARY_CELLS = {BSpline.QUADRATIC: 2, BSpline.CUBIC: 3}
MAX_GRID_NODES = 512**3


def check_scene(scene: Scene) -> None:
    """Raise ConfigError (key path + problem) for the first inconsistency found."""
    _check_grid_numbers(scene)
    layout = grid_layout(scene.sim)
    _check_sim(scene)
    _check_material(scene)
    _check_particle_mass(scene, layout.dx)
    _check_render(scene)
    names = camera_names(scene.render)
    _check_target(scene, names)
    _check_losses(scene)


@dataclass(frozen=True)
class GridLayout:
    """The grid a ``SimConfig`` asks for: cell size ``dx`` [m] and cells per axis (sim/grid.py builds on it)."""

    dx: float
    cells: tuple[int, int, int]


def grid_layout(sim) -> GridLayout:
    """Cell size and counts of a ``SimConfig``; ConfigError when the domain does not tile into cells of size dx,
    leaves no interior inside the wall band, or is too large."""
    lower, upper = sim.domain.lower, sim.domain.upper
    extents = [hi - lo for lo, hi in zip(lower, upper)]
    for axis, extent in zip("xyz", extents):
        if extent <= 0:
            raise ConfigError("sim.domain", f"upper must exceed lower on every axis ({axis}: {extent:g} m)")
    if sim.dx is not None:
        dx, key = float(sim.dx), "sim.dx"
    else:
        dx, key = max(extents) / (sim.grid_resolution or DEFAULT_RESOLUTION), "sim.grid_resolution"
    cells = []
    for axis, extent in zip("xyz", extents):
        count = extent / dx
        whole = round(count)
        if whole < 1 or abs(count - whole) > 1e-6 * max(1.0, count):
            raise ConfigError(
                "sim.domain",
                f"the {axis} extent {extent:g} m is not a whole number of cells of dx = {dx:g} m "
                f"({count:.3f} cells); change the domain or {key}",
            )
        cells.append(whole)
    band = sim.boundary_cells
    if band < MIN_BOUNDARY_CELLS[sim.bspline]:
        raise ConfigError(
            "sim.boundary_cells",
            f"must be >= {MIN_BOUNDARY_CELLS[sim.bspline]} with {sim.bspline} B-splines, got {band}",
        )
    if min(cells) <= 2 * band:
        raise ConfigError(
            key, f"the grid has {min(cells)} cells on its shortest axis, no interior left inside {band} wall cells"
        )
    if math.prod(cells) > MAX_GRID_NODES:
        raise ConfigError(key, f"grid of {cells[0]}x{cells[1]}x{cells[2]} nodes is too large (limit 512^3)")
    return GridLayout(dx=dx, cells=tuple(cells))


def camera_names(render) -> tuple[str, ...]:
    """Names of the cameras ``render.cameras`` makes, in order (an orbit rig's are its name + 0, 1, ...); ConfigError
    when a name is used twice. A capture rig's names come from its file (render/capture.py) and are not listed."""
    names = []
    for cam in render.cameras:
        if cam.type == "capture":
            continue
        names += [f"{cam.name}{j}" for j in range(len(cam.azimuths))] if cam.type == "orbit" else [cam.name]
    seen = set()
    for name in names:
        if name in seen:
            raise ConfigError("render.cameras", f"camera name '{name}' is used twice")
        seen.add(name)
    return tuple(names)


def material_starts(scene: Scene) -> list[tuple[float, float, float]]:
    """The (E [Pa], nu, density [kg/m^3]) a run of ``scene`` may start from, for the CFL check before a run
    (sim.grid.fastest_material picks the fastest wave): the material at its stiffest (material, learn.*.init and
    target.truth values), and each of material.regions with its own E, nu and density (the material's where it gives
    none; a region's E and nu never below the learned init and the truth, which may apply to it). Snow is held as it
    starts, fresh (J_P = 1): its hardening exp(xi (1 - J_P)) grows with a compaction the model bounds by nothing (J_P
    only shrinks while compressed), so no bound exists to hold it at; the rollout's check holds each particle's
    starting J_P0."""
    truth = scene.target.truth
    material = scene.material
    learned_E = [e for e in (scene.learn.E.init, truth.E if truth else None) if e is not None]
    learned_nu = [n for n in (scene.learn.nu.init, truth.nu if truth else None) if n is not None]
    starts = [(max([material.E, *learned_E]), max([material.nu, *learned_nu]), material.density)]
    for region in material.regions:
        E = max([region.E if region.E is not None else material.E, *learned_E])
        nu = max([region.nu if region.nu is not None else material.nu, *learned_nu])
        starts.append((E, nu, region.density if region.density is not None else material.density))
    return starts


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


# every model's parameters beside E and nu (enums.MODEL_PARAMETERS); the learnable ones have learn.<key> and truths
EXTRA_MATERIAL_PARAMETERS = ("yield_stress", "friction_angle", "cohesion", "viscosity", "hardening",
                             "critical_compression", "critical_stretch", "flow_index")
# parameters with a default (schema): another model's is refused only where it differs from the default
DEFAULTED_PARAMETERS = {"flow_index": 1.0, "cohesion": 0.0}
LEARNABLE_MATERIAL_PARAMETERS = ("yield_stress", "friction_angle", "cohesion", "viscosity", "hardening")


def _present_models(material):
    """material.model and the models material.regions name (sim.model.scene_models' set)."""
    return {material.model, *(region.model for region in material.regions if region.model is not None)}


def _models_phrase(models) -> str:
    names = sorted(m.value for m in models)
    return f"material.model {names[0]}" if len(names) == 1 else f"any model of this scene ({', '.join(names)})"


def _check_material(scene: Scene) -> None:
    """A plastic or fluid model needs its own parameters (material.<name>; with material.regions of other models,
    material.<name> is the value of every particle whose model has it); no parameter of a model the scene does not
    use may be given, learned or be a truth (it would silently do nothing)."""
    material, truth = scene.material, scene.target.truth
    present = _present_models(material)
    used = {name for m in present for name in m.parameters}
    needed = material.model.parameters
    model = _models_phrase(present)
    for name in EXTRA_MATERIAL_PARAMETERS:
        if name in used:
            continue
        if getattr(material, name) is not None and getattr(material, name) != DEFAULTED_PARAMETERS.get(name):
            raise ConfigError(f"material.{name}", f"is not a parameter of {model}")
        if name not in LEARNABLE_MATERIAL_PARAMETERS:
            continue
        if getattr(scene.learn, name).enabled:
            raise ConfigError(f"learn.{name}.enabled", f"{model} has no {name} to learn")
        if truth is not None and getattr(truth, name) is not None:
            raise ConfigError(f"target.truth.{name}", f"is not a parameter of {model}")
    for name in needed:
        if getattr(material, name) is None:
            raise ConfigError(f"material.{name}", f"material.model {material.model.value} needs it")
    _check_regions(scene)
    _check_learned_cohesion(scene)


REGION_KEYS = ("E", "nu", "density", *EXTRA_MATERIAL_PARAMETERS)


def _check_regions(scene: Scene) -> None:
    """material.regions: each region's parameters are its own model's (region.model, else material.model), each
    needed one given by the region or by material.<name>; no global learned value or truth of a key that regions set
    (it would replace the regions' values)."""
    material, truth = scene.material, scene.target.truth
    for i, region in enumerate(material.regions):
        key = f"material.regions[{i}]"
        own = region.model if region.model is not None else material.model
        model = f"material.model {own.value}" if region.model is None else f"its model {own.value}"
        for name in EXTRA_MATERIAL_PARAMETERS:
            if getattr(region, name) is not None and name not in own.parameters:
                raise ConfigError(f"{key}.{name}", f"is not a parameter of {model}")
        for name in own.parameters:
            if getattr(region, name) is None and getattr(material, name) is None:
                raise ConfigError(f"{key}.{name}", f"{model} needs it (here, or as material.{name} for every "
                                                   "particle of a model that has it)")
    for name in REGION_KEYS:
        if not any(getattr(region, name) is not None for region in material.regions) or name == "density":
            continue
        section = getattr(scene.learn, name, None)
        if section is not None and section.enabled and not section.per_particle:
            raise ConfigError(f"learn.{name}.per_particle", f"material.regions set {name} per region: learn it per "
                                                            "particle (one global value would replace the regions')")
        if section is not None and section.enabled and section.init is not None:
            raise ConfigError(f"learn.{name}.init", f"material.regions set {name} per region: leave init null (it "
                                                    "would replace the regions' values)")
        if truth is not None and getattr(truth, name, None) is not None:
            raise ConfigError(f"target.truth.{name}", f"material.regions set {name} per region: a global truth would "
                                                      "replace the regions' values")


def _check_learned_cohesion(scene: Scene) -> None:
    """learn.cohesion optimises log c (params.py), which cannot start from c = 0 (log c = -inf, where the gradient
    is 0 and no step moves it): every drucker_prager particle must start at c > 0, from learn.cohesion.init or from
    material.cohesion (and, where material.regions set cohesion, each drucker_prager region's own value)."""
    learn, material = scene.learn.cohesion, scene.material
    sand = Material.DRUCKER_PRAGER
    if not learn.enabled or learn.init is not None or sand not in _present_models(material):
        return  # (another model's learn.cohesion is refused by _check_material)
    why = "learned as log c, cohesion cannot start from 0"
    if not material.keys_set_by_regions(["cohesion"]):
        if material.cohesion == 0:
            raise ConfigError("learn.cohesion.init", f"{why} (material.cohesion is 0): give a positive starting "
                                                     "value [Pa], or material.cohesion > 0")
        return
    for i, region in enumerate(material.regions):
        if (region.model or material.model) == sand and region.cohesion == 0:
            raise ConfigError(f"material.regions[{i}].cohesion", f"{why}: give the region a positive value [Pa]")
    takes_material = material.model == sand or any(region.model == sand and region.cohesion is None
                                                   for region in material.regions)
    if material.cohesion == 0 and takes_material:
        raise ConfigError("material.cohesion", f"{why}: the drucker_prager particles without a region's own value "
                                               "start at material.cohesion = 0; set it > 0 (learn.cohesion.init stays "
                                               "null where regions set cohesion)")


def _check_particle_mass(scene: Scene, dx: float) -> None:
    """A particle's volume (spacing^3) and mass (density x volume) must be normal float32 numbers with room for sums
    and products: 1e-30..1e30."""
    spacing = dx / scene.sim.particles_per_cell
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


def _check_render(scene: Scene) -> None:
    render = scene.render
    if render.near >= render.far:
        raise ConfigError("render.near", f"must be < render.far ({render.far:g}), got {render.near:g}")


def _check_target(scene: Scene, cameras: tuple[str, ...]) -> None:
    target = scene.target
    if target.mesh is None and not target.images and not target.sequences and target.truth is None:
        raise ConfigError("target", "give a mesh, images or truth (or picture sequences) to compare the result with")
    for i in range(len(target.sequences)):
        sequence_steps(scene, i)  # refuses a sequence faster than the simulation or outside the simulated time
    if target.truth is not None and all(v is None for v in target.truth.model_dump().values()):
        raise ConfigError("target.truth", "gives no value: set E, nu, v0 and/or the material model's parameter (an "
                                          "empty truth is the source itself)")
    for i, image in enumerate(target.images):
        key = f"target.images[{i}]"
        captured = any(cam.type == "capture" for cam in scene.render.cameras)  # names known once read (assets)
        if image.camera not in cameras and not captured:
            raise ConfigError(f"{key}.camera", f"no camera named '{image.camera}' (cameras: {', '.join(cameras)})")
        if image.frame is not None and image.frame > scene.sim.steps:
            raise ConfigError(f"{key}.frame", f"must be <= sim.steps ({scene.sim.steps}), got {image.frame}")
        if image.frame is not None and image.frame != scene.sim.steps and image.frame not in scene.sim.frames:
            raise ConfigError(f"{key}.frame", f"step {image.frame} is not kept by the rollout: add it to sim.frames")


def _check_losses(scene: Scene) -> None:
    loss, target = scene.loss, scene.target
    if loss.grid_mass > 0 and target.mesh is None:
        raise ConfigError("loss.grid_mass", "needs target.mesh; set the weight to 0 or give a target mesh")
    if loss.depth_l1 > 0 and target.mesh is None and target.truth is None:
        raise ConfigError("loss.depth_l1", "needs target.mesh or target.truth (images carry no depth)")
    weights = [loss.grid_mass, loss.silhouette, loss.rgb_l1, loss.dssim, loss.depth_l1]
    if not any(w > 0 for w in weights):
        raise ConfigError("loss", "every data term has weight 0: nothing would be fitted")
