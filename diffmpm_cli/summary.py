"""What `diffmpm validate` reports about a loaded scene and its assets."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config.checks import material_starts
from .render.rasterize import raster_memory
from .sim.grid import cfl_number, control_layers, default_segment_length, fastest_material, kept_frames, rollout_memory


@dataclass(frozen=True)
class SceneSummary:
    name: str
    source_particles: int
    target_particles: int | None
    grid_shape: tuple[int, int, int]
    dx: float
    particle_spacing: float
    dt: float
    steps: int
    duration: float
    bspline: str
    control_layers: int
    cfl: float
    cfl_limit: float
    memory_full_tape: int
    memory_checkpointed: int
    segment_length: int
    camera_count: int
    surface_gaussians: int
    rendered_frames: int
    memory_render: int
    meshes: dict[str, str]  # mesh files: what was repaired and which inside test places the particles

    @property
    def cfl_ok(self) -> bool:
        return self.cfl <= self.cfl_limit

    def as_dict(self) -> dict:
        return {**asdict(self), "cfl_ok": self.cfl_ok}


def summarize_scene(*, scene, assets, camera_count: int) -> SceneSummary:
    """Counts, grid, time stepping, CFL number and a taped-rollout memory estimate of a scene."""
    sim = scene.sim
    particles = assets.source.particle_count
    E_max, nu_max, density = fastest_material(material_starts(scene))  # the fastest wave a run starts with
    layers = control_layers(sim.steps, sim.control_stride)
    memory = rollout_memory(particle_count=particles, node_count=assets.grid.node_count, steps=sim.steps,
                            control_layers=layers if scene.learn.dFc.enabled else 0,
                            segment_length=sim.segment_length or default_segment_length(sim.steps))
    if assets.source.splats is not None:  # a trained 3DGS source renders its own (selected) Gaussians
        gaussians = int(assets.source.surface_points.shape[0])
    else:
        gaussians = scene.appearance.surface_samples if scene.appearance.gaussians == "surface" else particles
    frames = len(kept_frames(sim.steps, sim.frames))
    render = frames * raster_memory(gaussians=gaussians, cameras=camera_count, width=scene.render.width,
                                    height=scene.render.height)
    return SceneSummary(
        name=scene.name,
        source_particles=particles,
        target_particles=assets.target.particle_count if assets.target is not None else None,
        grid_shape=assets.grid.shape,
        dx=assets.grid.dx,
        particle_spacing=assets.spacing,
        dt=sim.dt,
        steps=sim.steps,
        duration=sim.dt * sim.steps,
        bspline=sim.bspline,
        control_layers=layers,
        cfl=cfl_number(E=E_max, nu=nu_max, density=density, dt=sim.dt, dx=assets.grid.dx),
        cfl_limit=sim.cfl_limit,
        memory_full_tape=memory.full_tape,
        memory_checkpointed=memory.checkpointed,
        segment_length=memory.segment_length,
        camera_count=camera_count,
        surface_gaussians=gaussians,
        rendered_frames=frames,
        memory_render=render,
        meshes={name: _mesh_note(body.mesh) for name, body in (("source", assets.source), ("target", assets.target))
                if body is not None and body.mesh.metadata.get("inside_test")},
    )


def _mesh_note(mesh) -> str:
    """'closed; inside by ray parity' or 'left open (...): inside by generalised winding number', with repairs."""
    meta = mesh.metadata
    test = {"parity": "ray parity", "winding": "generalised winding number"}.get(meta["inside_test"], meta["inside_test"])
    state = f"left open ({meta['defects']})" if meta.get("defects") else "closed"
    repairs = meta.get("repairs")
    return f"{state}; inside by {test}" + (f"; repaired: {', '.join(repairs) if isinstance(repairs, list) else repairs}"
                                           if repairs else "")
