"""Assets: the scene's shapes as meshes, particles, the target's grid mass and surface samples, its cameras.

``build_assets(scene)`` is the only entry point the pipeline needs; it returns torch tensors (float32, CPU). It is
also where the scene's geometry is checked (the loader checks values only): shapes inside the interior and above
the floor, cameras that see the domain, target pictures that decode at the render size. Every refusal names its
key path (AssetError or ConfigError, exit code 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import trimesh

from ..errors import AssetError, ConfigError
from ..render.camera import CameraSet, build_cameras, check_view, similarity
from ..sim.grid import GridSpec
from .images import load_picture
from .lattice import WINDING_INSIDE, lattice_box_count, lattice_particles, winding_numbers
from .sequences import sequence_pictures
from .shapes import build_mesh
from .splat_source import SplatCloud, place_splats, read_splat_ply, select_splats, splat_particles

__all__ = ["Body", "SceneAssets", "build_assets", "build_mesh", "make_body", "check_inside", "check_above_floor",
           "MAX_PARTICLES"]

MAX_PARTICLES = 20_000_000
MAX_LATTICE = 8 * MAX_PARTICLES  # lattice points of a shape's bounding box that the inside test may hold at once


@dataclass
class Body:
    """One object in its rest configuration.

    ``positions`` [N, 3] m, ``volumes`` [N] m^3 (rest volume), ``masses`` [N] kg, ``surface_points`` [M, 3] m and
    ``surface_normals`` [M, 3] (unit, outward) sampled on ``mesh``.
    """

    mesh: trimesh.Trimesh
    positions: torch.Tensor
    volumes: torch.Tensor
    masses: torch.Tensor
    surface_points: torch.Tensor
    surface_normals: torch.Tensor
    splats: SplatCloud | None = None  # a trained 3DGS source: its Gaussians (surface_points are their means)
    region: torch.Tensor | None = None  # [N] int64: the material.regions entry each particle lies in (-1: none)
    filled: tuple[int, int] | None = None  # a 3DGS source: (particles the Gaussians cover, particles filled inside)

    @property
    def particle_count(self) -> int:
        return int(self.positions.shape[0])


@dataclass
class SceneAssets:
    grid: GridSpec
    spacing: float  # particle lattice spacing dx / particles_per_cell [m]
    source: Body
    target: Body | None  # None when the target has no mesh
    target_grid_mass: torch.Tensor | None  # [nx, ny, nz] kg
    cameras: CameraSet | None = None  # render.cameras, each checked to see the domain's centre


def make_body(mesh: trimesh.Trimesh, *, key: str, grid: GridSpec, particles_per_cell: int, density: float,
              jitter: float, surface_samples: int, rng: np.random.Generator) -> Body:
    """Particles of ``mesh`` on the grid's lattice plus surface samples; raises AssetError naming ``key``."""
    check_inside(mesh.bounds, grid, key)
    spacing = grid.dx / particles_per_cell
    expected = abs(float(mesh.volume)) / (spacing * spacing * spacing)  # before the lattice is allocated
    if expected > MAX_PARTICLES or lattice_box_count(mesh.bounds, origin=grid.lower, spacing=spacing) > MAX_LATTICE:
        raise AssetError(key, f"about {expected:,.0f} particles (at spacing {spacing:.4g} m) would exceed the limit of "
                              f"{MAX_PARTICLES:,}; lower sim.grid_resolution or sim.particles_per_cell")
    points = lattice_particles(mesh, origin=grid.lower, spacing=spacing, jitter=jitter, rng=rng)
    if len(points) == 0:
        raise AssetError(key, f"the shape holds no particle at spacing {spacing:.4g} m: it is thinner than the lattice; "
                              "raise sim.grid_resolution or sim.particles_per_cell")
    if len(points) > MAX_PARTICLES:
        raise AssetError(key, f"{len(points)} particles exceed the limit of {MAX_PARTICLES}; lower the resolution")
    check_inside(np.stack([points.min(axis=0), points.max(axis=0)]), grid, key)
    volume = spacing**3
    count = len(points)
    # blue-noise samples (no two closer than ~ the mean spacing): even coverage, so small discs leave no gaps
    surface, faces = trimesh.sample.sample_surface_even(mesh, surface_samples, seed=int(rng.integers(2**31)))
    normals = mesh.face_normals[faces]
    as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    return Body(
        mesh=mesh,
        positions=as_tensor(points),
        volumes=torch.full((count,), volume, dtype=torch.float32),
        masses=torch.full((count,), density * volume, dtype=torch.float32),
        surface_points=as_tensor(surface),
        surface_normals=as_tensor(normals),
    )


def make_splat_body(scene, *, key: str, grid: GridSpec, density: float) -> Body:
    """The body of a ``gaussians`` source (assets/splat_source.py): its Gaussians read, selected and placed, and
    particles on the grid's lattice where they cover and enclose the object; the mesh is the particles' convex hull
    (bounds, floor and view checks). Raises AssetError / ConfigError naming ``key`` or the conflicting setting."""
    src = scene.source
    if scene.appearance.gaussians != "surface":
        raise ConfigError("appearance.gaussians", "a gaussians source renders its own trained Gaussians: use surface")
    for name in ("color", "opacity"):
        section = getattr(scene.learn, name)
        if section.enabled and not section.per_gaussian:
            raise ConfigError(f"learn.{name}.per_gaussian", f"a gaussians source has one {name} per trained Gaussian: "
                                                            "set per_gaussian: true")
        if section.enabled and section.init is not None:
            raise ConfigError(f"learn.{name}.init", f"a gaussians source starts from its trained {name}s: leave null")
    cloud = read_splat_ply(src.path, key=f"{key}.path")
    crop_sphere = None if src.crop_sphere is None else (src.crop_sphere.center, src.crop_sphere.radius)
    cloud = select_splats(cloud, crop_box=src.crop_box, crop_sphere=crop_sphere, min_opacity=src.min_opacity, key=key)
    if src.world_from_capture is not None:
        scale, rotation, shift = similarity(src.world_from_capture, f"{key}.world_from_capture")
        cloud = place_splats(cloud, scale=scale, rotation=rotation, shift=shift)
    spacing = grid.dx / scene.sim.particles_per_cell
    points, shell, filled = splat_particles(cloud, origin=grid.lower, spacing=spacing, sigmas=src.occupancy_sigmas,
                                            fill=src.fill, key=key, max_points=MAX_LATTICE)
    if len(points) < 4:
        raise AssetError(key, f"the Gaussians cover {len(points)} particle-lattice points at spacing {spacing:.4g} m: "
                              "raise sim.grid_resolution or sim.particles_per_cell, or occupancy_sigmas")
    if len(points) > MAX_PARTICLES:
        raise AssetError(key, f"{len(points):,} particles exceed the limit of {MAX_PARTICLES:,}; lower the resolution")
    try:
        hull = trimesh.convex.convex_hull(points)
    except Exception as exc:  # noqa: BLE001 - qhull refuses flat point sets with its own error types
        raise AssetError(key, f"the particles span no volume (all in one plane?): {exc}") from None
    as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    volume = spacing**3
    return Body(mesh=hull, positions=as_tensor(points), volumes=torch.full((len(points),), volume),
                masses=torch.full((len(points),), density * volume), surface_points=as_tensor(cloud.means),
                surface_normals=as_tensor(cloud.normals()), splats=cloud, filled=(shell, filled))


def assign_regions(scene, body: Body, grid: GridSpec) -> None:
    """Each particle's material.regions entry (the last whose shape holds its rest position; generalised winding
    number > 1/2) into ``body.region``, and its region's density into ``body.masses``. A region that holds no
    particle is refused (its values would silently do nothing)."""
    points = body.positions.double().numpy()
    index = np.full(len(points), -1, dtype=np.int64)
    for i, region in enumerate(scene.material.regions):
        key = f"material.regions[{i}].shape"
        mesh = build_mesh(region.shape, key=key, default_center=grid.center)
        inside = winding_numbers(mesh, points, key=key) > WINDING_INSIDE
        if not inside.any():
            raise AssetError(key, "holds no particle of the source")
        index[inside] = i
    body.region = torch.as_tensor(index)
    density = torch.full((len(points),), float(scene.material.density))
    for i, region in enumerate(scene.material.regions):
        if region.density is not None:
            density[body.region == i] = region.density
    body.masses = (density * body.volumes.double()).float()


def region_values(scene, region: torch.Tensor | None, keys) -> dict[str, torch.Tensor]:
    """key -> [N] float32 natural values (material.<key>, replaced where a region gives its own) for the ``keys``
    that some region sets; {} without regions. Where material.<key> is null (a parameter of a model only regions
    use) the other particles take the first region's value: their models never read it."""
    out = {}
    if region is None:
        return out
    for key in scene.material.keys_set_by_regions(keys):
        given = [(i, getattr(r, key)) for i, r in enumerate(scene.material.regions) if getattr(r, key) is not None]
        default = getattr(scene.material, key)
        values = torch.full((len(region),), float(default if default is not None else given[0][1]))
        for i, value in given:
            values[region == i] = value
        out[key] = values
    return out


def region_model_codes(scene, region: torch.Tensor | None, models) -> torch.Tensor | None:
    """[N] int64: each particle's constitutive model as its index in ``models`` (sim.model.scene_models: material.model
    first), from the region it lies in (a region without a model, and no region: material.model); None for one
    model."""
    if region is None or len(models) == 1:
        return None
    codes = torch.zeros(len(region), dtype=torch.int64)
    for i, r in enumerate(scene.material.regions):
        if r.model is not None:
            codes[region == i] = list(models).index(r.model)
    return codes


def check_inside(bounds, grid: GridSpec, key: str) -> None:
    lo, hi = np.asarray(bounds[0]), np.asarray(bounds[1])
    ilo, ihi = np.asarray(grid.interior_lower), np.asarray(grid.interior_upper)
    if np.all(lo >= ilo) and np.all(hi <= ihi):
        return
    fmt = lambda v: "[" + ", ".join(f"{x:.3g}" for x in v) + "]"  # noqa: E731
    raise AssetError(
        key,
        f"extends outside the simulation interior {fmt(ilo)}..{fmt(ihi)} m (its bounds are {fmt(lo)}..{fmt(hi)}; "
        f"the outer {grid.boundary_cells} cells are wall band): move or shrink it, or enlarge sim.domain",
    )


def check_above_floor(mesh: trimesh.Trimesh, floor, key: str) -> None:
    """With ``sim.floor`` enabled, no vertex of ``mesh`` lies below the floor plane (AssetError naming ``key``)."""
    if not floor.enabled:
        return
    normal = np.asarray(floor.normal, dtype=np.float64)
    normal = normal / np.linalg.norm(normal)
    lowest = float(np.min(mesh.vertices @ normal))
    if lowest < floor.height:
        raise AssetError(key, f"reaches below the floor plane (height {floor.height:g} m along the normal; "
                              f"the shape goes down to {lowest:.4g} m)")


TARGET_SAMPLES_FACTOR = 4


def target_surface_samples(scene) -> int:
    """How many surface Gaussians render the target mesh (and sample its surface for Chamfer): target.surface_samples,
    else 4 x appearance.surface_samples. The target is rendered once, so it can afford to be sharper than the source
    (at 4x, the target's own Gaussians score >= 0.955 IoU against the exact mesh at 256^2 on the shipped scenes)."""
    if scene.target.surface_samples is not None:
        return scene.target.surface_samples
    return TARGET_SAMPLES_FACTOR * scene.appearance.surface_samples


def build_assets(scene, *, device: str = "cpu") -> SceneAssets:
    """Meshes, particles, target grid mass and surface samples of a loaded ``Scene``.

    Everything is on the CPU except the target's grid mass, which is transferred (a Warp kernel) on ``device``:
    the device the run will use, which need not have a CPU kernel compiler.
    """
    from ..sim.op import grid_mass

    grid = GridSpec.from_sim(scene.sim)
    rng = np.random.default_rng(scene.optimize.seed)
    common = dict(grid=grid, particles_per_cell=scene.sim.particles_per_cell, density=scene.material.density,
                  jitter=scene.sim.jitter)
    # every shape first (cheap refusals before any particles are made)
    splat_body = None
    if scene.source.shape == "gaussians":  # a trained 3DGS scene: its particles come from its Gaussians
        splat_body = make_splat_body(scene, key="source", grid=grid, density=scene.material.density)
        source_mesh = splat_body.mesh
    else:
        source_mesh = build_mesh(scene.source, key="source", default_center=grid.center)
    check_inside(source_mesh.bounds, grid, "source")
    check_above_floor(source_mesh, scene.sim.floor, "source")
    target_mesh = None
    if scene.target.mesh is not None:
        target_mesh = build_mesh(scene.target.mesh, key="target.mesh", default_center=grid.center)
        check_inside(target_mesh.bounds, grid, "target.mesh")
    cameras = build_cameras(scene.render, default_target=grid.center)
    check_view(cameras, scene.render, grid.center)
    for i, image in enumerate(scene.target.images):  # decoded in full: a picture validate accepts is one a run reads
        if image.camera not in cameras.names:  # capture rigs name their cameras only once read
            shown = ", ".join(cameras.names[:8]) + (", ..." if len(cameras.names) > 8 else "")
            raise ConfigError(f"target.images[{i}].camera", f"no camera named '{image.camera}' (cameras: {shown})")
        load_picture(image.path, key=f"target.images[{i}].path", size=(scene.render.width, scene.render.height),
                     mask=image.mask, mask_key=f"target.images[{i}].mask", background=scene.target.image_background,
                     tolerance=scene.target.image_background_tolerance)
    for i, sequence in enumerate(scene.target.sequences):  # every used picture decoded, as for target.images
        if sequence.camera not in cameras.names:
            shown = ", ".join(cameras.names[:8]) + (", ..." if len(cameras.names) > 8 else "")
            raise ConfigError(f"target.sequences[{i}].camera", f"no camera named '{sequence.camera}' (cameras: {shown})")
        for _ in sequence_pictures(scene, i):
            pass
    source = splat_body or make_body(source_mesh, key="source", rng=rng,
                                     surface_samples=scene.appearance.surface_samples, **common)
    if scene.material.regions:
        assign_regions(scene, source, grid)
    target = target_mass = None
    if target_mesh is not None:
        target = make_body(target_mesh, key="target.mesh", rng=rng, surface_samples=target_surface_samples(scene),
                           **common)
        target_mass = grid_mass(target.positions.to(device), target.masses.to(device), grid=grid,
                                bspline=scene.sim.bspline)
    return SceneAssets(grid=grid, spacing=grid.dx / scene.sim.particles_per_cell, source=source, target=target,
                       target_grid_mass=target_mass, cameras=cameras)
