"""The static MPM model (grid, time step, material model, walls, floor, controls) and the state/grid factories."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from ..enums import BSpline, Material, WallKind
from ..warp_runtime import warp
from .grid import GridSpec, control_layers

FACES = ("x", "y", "z")


@dataclass(frozen=True)
class MPMModel:
    """Everything about a simulation that does not change during a rollout (SI units).

    ``f_blend`` is the seed's F smoothing weight a (F <- a F + (1 - a) I; 1 = off); ``min_J`` clamps det F from
    below (0 = off); ``bulk_viscosity`` adds zeta tr(C) I to the Kirchhoff stress [Pa s] (0 = off).
    ``bspline``, ``material`` and the walls (per axis x, y, z) take enum members or their names. ``models``: every
    constitutive model the particles use (material.regions may name others), ``material`` first; a particle's model
    code (``Simulator(model_code=...)``) is its model's index here. Empty: ``(material,)``.
    """

    grid: GridSpec
    bspline: BSpline
    material: Material
    dt: float
    gravity: tuple[float, float, float]
    walls_min: tuple[WallKind, WallKind, WallKind]
    walls_max: tuple[WallKind, WallKind, WallKind]
    floor_enabled: bool = False
    floor_normal: tuple[float, float, float] = (0.0, 1.0, 0.0)
    floor_height: float = 0.0
    friction: float = 0.0
    f_blend: float = 1.0
    bulk_viscosity: float = 0.0
    min_J: float = 0.0
    control_stride: int = 1
    cfl_limit: float = 0.5
    models: tuple[Material, ...] = ()

    def __post_init__(self):
        # names become members (ValueError for any other); the kernels get their ints from the members
        object.__setattr__(self, "bspline", BSpline(self.bspline))
        object.__setattr__(self, "material", Material(self.material))
        models = tuple(Material(m) for m in self.models) or (self.material,)
        if models[0] != self.material or len(set(models)) != len(models):
            raise ValueError(f"models must list material ({self.material.value}) first and each model once: {models}")
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "walls_min", tuple(WallKind(w) for w in self.walls_min))
        object.__setattr__(self, "walls_max", tuple(WallKind(w) for w in self.walls_max))

    @classmethod
    def from_scene(cls, scene, grid: GridSpec | None = None) -> MPMModel:
        sim, material = scene.sim, scene.material
        grid = grid or GridSpec.from_sim(sim)
        walls = sim.boundaries
        normal = np.asarray(sim.floor.normal, dtype=np.float64)
        normal = normal / max(np.linalg.norm(normal), 1e-30)
        return cls(
            grid=grid,
            bspline=sim.bspline,
            material=material.model,
            dt=sim.dt,
            gravity=tuple(sim.gravity),
            walls_min=tuple(getattr(walls, f"{a}_min") for a in FACES),
            walls_max=tuple(getattr(walls, f"{a}_max") for a in FACES),
            floor_enabled=sim.floor.enabled,
            floor_normal=tuple(float(c) for c in normal),
            floor_height=sim.floor.height,
            friction=sim.floor.friction,
            f_blend=material.f_smoothing if material.f_smoothing is not None else 1.0,
            bulk_viscosity=material.bulk_viscosity,
            min_J=material.min_J or 0.0,
            control_stride=sim.control_stride,
            cfl_limit=sim.cfl_limit,
            models=scene_models(material),
        )

    @property
    def mixed(self) -> bool:
        """Whether the particles use several constitutive models (per-particle model codes)."""
        return len(self.models) > 1

    @functools.cached_property
    def kernel_constants(self) -> SimpleNamespace:
        """The model's vectors as Warp values for kernel launches, built once per model (launchers read them every
        step): grid lower corner and interior box, gravity, floor normal, wall kinds as int codes per axis."""
        wp = warp()
        g = self.grid
        return SimpleNamespace(
            lower=wp.vec3(*g.lower), interior_lower=wp.vec3(*g.interior_lower),
            interior_upper=wp.vec3(*g.interior_upper), gravity=wp.vec3(*self.gravity),
            floor_normal=wp.vec3(*self.floor_normal), walls_min=wp.vec3i(*(w.code for w in self.walls_min)),
            walls_max=wp.vec3i(*(w.code for w in self.walls_max)),
        )

    def control_index(self, step: int) -> int:
        """Control layer applied at ``step`` (t_k = k stride), or -1."""
        return step // self.control_stride if step % self.control_stride == 0 else -1

    def control_layers(self, steps: int) -> int:
        """K = ceil(steps / stride) (grid.control_layers)."""
        return control_layers(steps, self.control_stride)


def scene_models(material) -> tuple[Material, ...]:
    """The constitutive models of a scene's ``material`` section: material.model, then each other model that
    material.regions name, in order of first appearance (a particle's model code is its model's index here)."""
    models = [Material(material.model)]
    for region in material.regions:
        if region.model is not None and Material(region.model) not in models:
            models.append(Material(region.model))
    return tuple(models)


@dataclass
class MPMState:
    """Particle state: x [N] vec3 (m), v [N] vec3 (m/s), F [N] mat33, C [N] mat33 (1/s), Jp [N] float (the plastic
    volume ratio det F_P: snow's hardening state; 1 at rest, carried unchanged by the other models)."""

    x: object
    v: object
    F: object
    C: object
    Jp: object

    FIELDS = ("x", "v", "F", "C", "Jp")

    @classmethod
    def zeros(cls, count: int, *, device: str, requires_grad: bool) -> MPMState:
        wp = warp()
        vec = dict(shape=count, device=device, requires_grad=requires_grad)
        return cls(x=wp.zeros(dtype=wp.vec3, **vec), v=wp.zeros(dtype=wp.vec3, **vec),
                   F=wp.zeros(dtype=wp.mat33, **vec), C=wp.zeros(dtype=wp.mat33, **vec),
                   Jp=wp.zeros(dtype=float, **vec))

    def arrays(self):
        return [getattr(self, name) for name in self.FIELDS]


@dataclass
class MPMGrid:
    """One step's grid: mass [kg] and momentum [kg m/s] (P2G's output, one vec4 (m, p) per node: ``mass_momentum``;
    ``mass`` and ``momentum`` are strided views of it), velocity after the update [m/s] (one vec4 (v, 0) per node:
    ``velocity4``, which G2P reads; ``velocity`` a strided view, which the grid update writes). Each view's gradient
    is the same view of its array's gradient."""

    mass_momentum: object
    mass: object
    momentum: object
    velocity4: object
    velocity: object
    box: object  # the nodes this step's particles reach (kernels/mpm.py particle_box): 6 ints, then its slots

    @classmethod
    def zeros(cls, shape, *, device: str, requires_grad: bool) -> MPMGrid:
        wp = warp()
        kw = dict(shape=shape, device=device, requires_grad=requires_grad)
        mm, v4 = wp.zeros(dtype=wp.vec4, **kw), wp.zeros(dtype=wp.vec4, **kw)
        (mass, momentum), (velocity,) = _views(mm, (float, 0), (wp.vec3, 4)), _views(v4, (wp.vec3, 0))
        if requires_grad:
            (mass.grad, momentum.grad), (velocity.grad,) = (_views(mm.grad, (float, 0), (wp.vec3, 4)),
                                                            _views(v4.grad, (wp.vec3, 0)))
            mass.requires_grad = momentum.requires_grad = velocity.requires_grad = True
        from ..kernels import bounds

        box = wp.zeros(6 * (1 + bounds.BOX_SLOTS), dtype=int, device=device)
        return cls(mass_momentum=mm, mass=mass, momentum=momentum, velocity4=v4, velocity=velocity, box=box)

    def zero_(self) -> None:
        """Zero what P2G accumulates into (and, for a grid with gradients, both gradients) and empty the particles'
        box (the grid update writes every velocity inside it, and no particle reads one outside). Only the last box's
        nodes are cleared (kernels/bounds.py clear_box, as wide as the widest B-spline's stencil from the box's bases):
        nothing outside it was written since the grid was last cleared, and a memset of every node was a third of a
        97k-particle step on 128^3 (BENCHMARKS.md)."""
        wp = warp()
        from ..kernels import bounds, mpm

        mm = self.mass_momentum
        grads = (mm.grad, self.velocity4.grad) if mm.grad is not None else (mm, mm)
        threads = mpm.box_threads(mm.device)
        wp.launch(bounds.clear_box, dim=threads, device=mm.device, record_tape=False,
                  inputs=[self.box, bounds.WIDEST, threads, 3 if mm.grad is not None else 1, mm, *grads])
        self.box.fill_(bounds.BOX_EMPTY)


def _views(array, *fields):
    """Arrays over the fields of a vec4 array, each (dtype, byte offset): same shape and strides."""
    wp = warp()
    kw = dict(shape=array.shape, strides=array.strides, device=array.device)
    return tuple(wp.array(ptr=array.ptr + offset, dtype=dtype, **kw) for dtype, offset in fields)
