"""The scene format: one pydantic v2 schema for the whole scene.

Every section that later stages read is here, so the format is designed once. Units are SI (m, s, kg, Pa);
angles are degrees. ``configs/defaults.yaml`` is generated from this module (``python -m
diffmpm_cli.config.defaults``) and a test keeps it current.
"""

from __future__ import annotations

import difflib
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, model_validator
from pydantic_core import PydanticCustomError

from ..enums import BSpline, Material, WallKind

# closed sets are the enums host code and kernels share (diffmpm_cli/enums.py), read from their names: the only
# input lax enum validation takes besides a member (strict mode would want a member)
BSplineName = Annotated[BSpline, Strict(False)]
MaterialName = Annotated[Material, Strict(False)]
FrictionAngle = Annotated[float, Field(gt=0.0, lt=90.0)]  # degrees
WallName = Annotated[WallKind, Strict(False)]

# ----------------------------------------------------------------------------------------------------------------
# building blocks


class Section(BaseModel):
    """Base of every scene section: unknown keys are errors with a "did you mean" hint; no inf/NaN.

    Validation is strict: a number is never read from a string or a boolean (``true`` is not 1), a list is a list
    (not a YAML ``!!set``), a boolean is true or false. Integer keys also take a whole float such as ``1e4``.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = sorted(cls.model_fields)
            for key in data:
                if key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.5)
                    hint = f"did you mean '{close[0]}'?" if close else "allowed: " + ", ".join(allowed)
                    raise PydanticCustomError("unknown_key", "unknown key ({hint})", {"key": str(key), "hint": hint})
        return data


def _exactly(count: int) -> BeforeValidator:
    """A list of exactly ``count`` items (one clear message instead of "at least" / "at most")."""

    def check(value: Any) -> Any:
        if isinstance(value, (list, tuple)) and len(value) != count:
            raise PydanticCustomError("item_count", "must have exactly {count} items, got {actual}",
                                      {"count": count, "actual": len(value)})
        return value

    return BeforeValidator(check)


def _whole(value: Any) -> Any:
    """An integer key accepts a float with no fractional part (``1e4``), never a boolean."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


INT64_MAX = 2**63 - 1
Int = Annotated[int, BeforeValidator(_whole), Field(le=INT64_MAX)]  # whole numbers up to what int64 holds

Vec3 = Annotated[list[float], _exactly(3)]
Color = Annotated[list[Annotated[float, Field(ge=0.0, le=1.0)]], _exactly(3)]
Row3 = Annotated[list[float], _exactly(3)]
Row4 = Annotated[list[float], _exactly(4)]
Mat3 = Annotated[list[Row3], _exactly(3)]
Mat4 = Annotated[list[Row4], _exactly(4)]
Positive = Annotated[float, Field(gt=0.0)]
Axis = Literal["x", "y", "z"]

# ----------------------------------------------------------------------------------------------------------------
# shapes (source and target): primitives, mesh files, and their booleans


class ShapeBase(Section):
    center: Vec3 | None = Field(
        None,
        description="position of the shape's centre [m]; null = the domain's centre for a top-level shape, "
        "the parent's origin for a part of a union/difference/intersection",
    )
    rotation: Vec3 = Field([0.0, 0.0, 0.0], description="rotation about x, then y, then z [deg]")
    scale: Positive = Field(1.0, description="uniform scale applied before rotation and translation")


class Sphere(ShapeBase):
    """A sphere (icosphere, 5120 faces)."""

    shape: Literal["sphere"]
    radius: Positive = Field(description="radius [m]")


class Box(ShapeBase):
    """An axis-aligned box before rotation."""

    shape: Literal["box"]
    size: Annotated[list[Positive], _exactly(3)] = Field(description="edge lengths x y z [m]")


class Torus(ShapeBase):
    """A ring torus around `axis` (genus 1)."""

    shape: Literal["torus"]
    major_radius: Positive = Field(description="distance from the centre to the tube's centre line [m]")
    minor_radius: Positive = Field(description="radius of the tube [m]; must be < major_radius")
    axis: Axis = Field("y", description="axis of symmetry before rotation")


class Capsule(ShapeBase):
    """A cylinder with hemispherical caps along `axis`."""

    shape: Literal["capsule"]
    radius: Positive = Field(description="radius [m]")
    height: Positive = Field(description="distance between the two cap centres [m] (total length = height + 2 radius)")
    axis: Axis = Field("y", description="long axis before rotation")


class Cylinder(ShapeBase):
    """A closed cylinder along `axis`."""

    shape: Literal["cylinder"]
    radius: Positive = Field(description="radius [m]")
    height: Positive = Field(description="length [m]")
    axis: Axis = Field("y", description="long axis before rotation")


MESH_SUFFIXES = (".obj", ".ply", ".stl", ".off", ".glb")


class MeshFile(ShapeBase):
    """A mesh file (obj, ply, stl, off, glb), recentred on its bounding-box centre."""

    shape: Literal["mesh"]
    path: str = Field(description="mesh file, relative to the scene file (resolved to an absolute path on load)")
    size: Positive | None = Field(
        None, description="if set, scale so the longest bounding-box side is this long [m] (before `scale`)"
    )


class Union_(ShapeBase):
    """The union of its parts (manifold3d boolean)."""

    shape: Literal["union"]
    parts: list[Shape] = Field(min_length=1, description="shapes, placed in this shape's frame")


class Difference(ShapeBase):
    """The first part minus all the others."""

    shape: Literal["difference"]
    parts: list[Shape] = Field(min_length=2, description="the first part minus the rest")


class Intersection(ShapeBase):
    """The volume common to all parts."""

    shape: Literal["intersection"]
    parts: list[Shape] = Field(min_length=2, description="shapes to intersect")


Shape = Annotated[
    Union[Sphere, Box, Torus, Capsule, Cylinder, MeshFile, Union_, Difference, Intersection],
    Field(discriminator="shape"),
]
SHAPE_TYPES = (Sphere, Box, Torus, Capsule, Cylinder, MeshFile, Union_, Difference, Intersection)
COMPOSITE_TYPES = (Union_, Difference, Intersection)
for _model in COMPOSITE_TYPES:
    _model.model_rebuild()

class SphereCrop(Section):
    center: Vec3 = Field(description="centre [m, the PLY's coordinates]")
    radius: Positive = Field(description="radius [m, the PLY's coordinates]")


class GaussianSource(Section):
    """A trained 3D Gaussian Splatting scene as the body (docs/CAPTURES.md): the INRIA PLY layout (SH degree 0..3,
    opacity logits, log scales, w x y z quaternions). The object is selected by a crop and an opacity threshold,
    filled with particles (the lattice points its Gaussians cover and those they enclose), and every Gaussian
    follows the particles around it (mean by the local deformation, covariance F S F^T, view-dependent colour
    evaluated in the rest frame)."""

    shape: Literal["gaussians"]
    path: str = Field(description="3DGS PLY file, relative to the scene file (resolved to an absolute path on load)")
    world_from_capture: Mat4 | None = Field(
        None, description="4x4 similarity (uniform scale x rotation, translation) taking the PLY's coordinates to the "
        "scene's [m] (the same matrix as the capture rig's); null = the PLY's coordinates are the scene's")
    crop_box: Annotated[list[Vec3], _exactly(2)] | None = Field(
        None, description="keep the Gaussians whose means lie in [lower, upper] (the PLY's coordinates); null = all")
    crop_sphere: SphereCrop | None = Field(None, description="keep the Gaussians within this sphere; null = all")
    min_opacity: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.1, description="keep the Gaussians at least this opaque (floaters and faint fog are dropped)")
    occupancy_sigmas: Annotated[float, Field(gt=0.0, le=5.0)] = Field(
        2.0, description="a particle-lattice point is inside the object when it lies within this many standard "
        "deviations (Mahalanobis distance) of a kept Gaussian")
    fill: bool = Field(True, description="also fill the lattice points the Gaussians enclose (a trained scene is a "
                       "shell of surface Gaussians; the interior is reported as filled)")


Source = Annotated[
    Union[Sphere, Box, Torus, Capsule, Cylinder, MeshFile, Union_, Difference, Intersection, GaussianSource],
    Field(discriminator="shape"),
]

# ----------------------------------------------------------------------------------------------------------------
# target


class TargetImage(Section):
    path: str = Field(description="PNG/JPEG image of any size with the render's aspect ratio (area-averaged to "
                      "render.width x render.height), relative to the scene file; alpha (if any) is the silhouette")
    camera: str = Field(description="name of a camera in render.cameras")
    mask: str | None = Field(None, description="silhouette as a separate greyscale image of the same size (white = "
                             "object), relative to the scene file; the image must then have no alpha")
    frame: Annotated[Int, Field(ge=0)] | None = Field(None, description="simulation step it shows; null = the final step")


class TargetSequence(Section):
    """One camera's pictures over time (docs/CAPTURES.md): a glob of pictures (sorted by name) or a video file, at
    `fps`. Picture k shows time start + k / fps, mapped to the nearest simulation step (kept automatically); the
    pictures inside the simulated time sim.steps x sim.dt are used."""

    camera: str = Field(description="name of a camera in render.cameras")
    path: str = Field(description="a glob of PNG/JPEG pictures such as 'frames/cam0_*.png' (sorted by name) or a video "
                      "file (.mp4, .mov, .avi, .mkv, .webm, .m4v; needs imageio-ffmpeg: pip install diffmpm[video]), "
                      "relative to the scene file; pictures of any size with the render's aspect")
    fps: Positive = Field(description="pictures per second of the sequence")
    start: Annotated[float, Field(ge=0.0)] = Field(0.0, description="simulation time of the first picture [s]")
    masks: str | None = Field(None, description="a glob of silhouettes, one per picture in the same order (greyscale, "
                              "white = object), relative to the scene file; null = alpha or image_background")


class Truth(Section):
    """Ground truth of a synthetic target: target frames are simulated from the source with these values."""

    E: Positive | None = Field(None, description="true Young's modulus [Pa]")
    nu: Annotated[float, Field(gt=-1.0, lt=0.5)] | None = Field(None, description="true Poisson ratio")
    v0: Vec3 | None = Field(None, description="true initial velocity [m/s]")
    yield_stress: Positive | None = Field(None, description="true yield stress [Pa] (material.model von_mises or "
                                          "bingham)")
    friction_angle: FrictionAngle | None = Field(
        None, description="true friction angle [degrees] (material.model drucker_prager)")
    cohesion: Annotated[float, Field(ge=0.0)] | None = Field(
        None, description="true cohesion c [Pa], >= 0 (material.model drucker_prager)")
    viscosity: Positive | None = Field(
        None, description="true dynamic viscosity [Pa s] (material.model newtonian_fluid or bingham)")
    hardening: Positive | None = Field(None, description="true hardening coefficient xi (material.model snow)")


class TargetConfig(Section):
    mesh: Shape | None = Field(None, description="target shape (any source shape), reached at the final step")
    images: list[TargetImage] = Field([], description="target images from known cameras")
    sequences: list[TargetSequence] = Field([], description="picture sequences or videos, one per camera, mapped to "
                                            "simulation steps by their fps")
    image_background: Color | None = Field(
        None, description="for images without alpha: pixels of this colour are background (RGB in [0, 1])"
    )
    image_background_tolerance: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        2.0 / 255.0, description="largest per-channel difference from image_background that still counts as "
        "background (keyed at full resolution, before downscaling); JPEGs want about 0.1")
    truth: Truth | None = Field(None, description="ground truth for synthetic targets (material identification)")
    color: Color | None = Field(None, description="colour of the target's rendered Gaussians; null = appearance.color")
    surface_samples: Annotated[int, Field(ge=1, le=10_000_000)] | None = Field(
        None, description="surface Gaussians rendering the target mesh (rendered once, so it can be sharper than the "
        "source; also its Chamfer samples); null = 4 x appearance.surface_samples")
    mesh_render: Literal["gaussians", "exact"] = Field(
        "gaussians", description="how a target mesh becomes training pictures: gaussians (its own surface Gaussians, "
        "rendered as the source is: the same blur at the training size) or exact (its triangles' coverage, 4x4 "
        "supersampled, in target.color: sharper, but at small sizes the source's Gaussians cannot match it)")


# ----------------------------------------------------------------------------------------------------------------
# material


class MaterialRegion(Section):
    """A part of the source with its own material values: the particles whose rest positions lie inside ``shape``
    take the values given here (null: material.<key>); a later region wins where regions overlap. A region may use
    another constitutive model (``model``): a jelly block on a sand bed, plasticine beside snow."""

    shape: Shape = Field(description="where the region is (any source shape, in world coordinates [m]; center null = "
                         "the domain's centre)")
    model: MaterialName | None = Field(
        None, description="the region's constitutive model; null = material.model. Its parameters come from the "
        "region, else from material.<key>")
    E: Positive | None = Field(None, description="Young's modulus [Pa]; null = material.E")
    nu: Annotated[float, Field(gt=-1.0, lt=0.5)] | None = Field(None, description="Poisson ratio; null = material.nu")
    density: Positive | None = Field(None, description="rest density [kg/m^3]; null = material.density")
    yield_stress: Positive | None = Field(None, description="von_mises, bingham [Pa]; null = material.yield_stress")
    friction_angle: FrictionAngle | None = Field(
        None, description="drucker_prager [degrees]; null = material.friction_angle")
    cohesion: Annotated[float, Field(ge=0.0)] | None = Field(
        None, description="drucker_prager [Pa], >= 0; null = material.cohesion")
    viscosity: Positive | None = Field(
        None, description="newtonian_fluid, bingham [Pa s] (bingham with flow_index N != 1: [Pa s^N]); null = "
        "material.viscosity")
    flow_index: Positive | None = Field(None, description="bingham (dimensionless); null = material.flow_index")
    hardening: Positive | None = Field(None, description="snow; null = material.hardening")
    critical_compression: Annotated[float, Field(gt=0.0, lt=1.0)] | None = Field(
        None, description="snow; null = material.critical_compression")
    critical_stretch: Positive | None = Field(None, description="snow; null = material.critical_stretch")


class MaterialConfig(Section):
    preset: str | None = Field(
        None, description="named preset from configs/materials.yaml; keys given here override the preset's"
    )
    model: MaterialName = Field(Material.FIXED_COROTATED, description="constitutive model")
    E: Positive = Field(2.0e4, description="Young's modulus [Pa]")
    nu: Annotated[float, Field(gt=-1.0, lt=0.5)] = Field(0.3, description="Poisson ratio, in (-1, 0.5)")
    density: Positive = Field(1000.0, description="rest density [kg/m^3]")
    f_smoothing: Annotated[float, Field(gt=0.0, lt=1.0)] | None = Field(
        None, description="seed extra, off when null: blend F <- a F + (1 - a) I each step (the seed used 0.955)"
    )
    bulk_viscosity: Annotated[float, Field(ge=0.0)] = Field(
        0.0, description="seed extra, off when 0: viscous stress coefficient on tr C (the seed used 0.25)"
    )
    min_J: Annotated[float, Field(gt=0.0, lt=1.0)] | None = Field(
        None, description="seed extra, off when null: clamp det F from below (the seed used 0.6)"
    )
    yield_stress: Positive | None = Field(
        None, description="von_mises, bingham: yield stress [Pa] (Hencky strain beyond yield_stress / (2 mu) flows)"
    )
    friction_angle: FrictionAngle | None = Field(
        None, description="drucker_prager: friction angle [degrees], in (0, 90)"
    )
    cohesion: Annotated[float, Field(ge=0.0)] = Field(
        0.0, description="drucker_prager: Mohr-Coulomb cohesion c [Pa], >= 0: the cone's apex moves into tension, to a "
        "mean stress c cot(friction_angle), so the sand holds that much tension and shear at zero pressure; 0 = "
        "cohesionless sand (Klar et al. 2016); learnable (learn.cohesion, as log c: learning starts from a positive "
        "value); other models: leave 0")
    viscosity: Positive | None = Field(
        None, description="newtonian_fluid: dynamic viscosity [Pa s]; E and nu set its bulk modulus E / (3 (1 - 2 nu)); "
        "bingham: the plastic viscosity [Pa s] of its flow above yield (deviatoric stress tau_Y + eta gamma_dot), "
        "or with flow_index N != 1 the consistency K [Pa s^N] (tau_Y + K gamma_dot^N)"
    )
    flow_index: Positive = Field(
        1.0, description="bingham: flow index N (dimensionless, > 0) of Herschel-Bulkley's law tau_Y + K gamma_dot^N "
        "above yield: 1 = Bingham, < 1 shear-thinning (pastes, ketchup), > 1 shear-thickening; a scene constant (not "
        "learnable); other models: leave 1")
    hardening: Positive | None = Field(
        None, description="snow: hardening coefficient xi; mu and lambda scale by exp(xi (1 - J_P)) (Stomakhin: 10)")
    critical_compression: Annotated[float, Field(gt=0.0, lt=1.0)] | None = Field(
        None, description="snow: critical compression theta_c; singular values of F_E below 1 - theta_c go plastic "
        "(Stomakhin: 2.5e-2)")
    critical_stretch: Positive | None = Field(
        None, description="snow: critical stretch theta_s; singular values of F_E above 1 + theta_s go plastic "
        "(Stomakhin: 7.5e-3)")
    regions: list[MaterialRegion] = Field(
        [], description="parts of the source with their own E, nu, density, model parameters and constitutive model "
        "(a different model per region is allowed); particles in no region keep the values above")

    def keys_set_by_regions(self, keys) -> list[str]:
        """Those of ``keys`` that some region sets (their values then differ by part of the source)."""
        return [key for key in keys if any(getattr(r, key, None) is not None for r in self.regions)]


# ----------------------------------------------------------------------------------------------------------------
# simulation


class Domain(Section):
    lower: Vec3 = Field([0.0, 0.0, 0.0], description="lower corner of the simulation box [m]")
    upper: Vec3 = Field([1.0, 1.0, 1.0], description="upper corner [m]; extents must be whole multiples of dx")



class Boundaries(Section):
    """Wall condition per domain face: sticky (v = 0), slip (normal v = 0), separate (outward normal v = 0)."""

    x_min: WallName = Field(WallKind.SEPARATE, description="wall condition of the x = lower face")
    x_max: WallName = Field(WallKind.SEPARATE, description="wall condition of the x = upper face")
    y_min: WallName = Field(WallKind.SEPARATE, description="wall condition of the y = lower face")
    y_max: WallName = Field(WallKind.SEPARATE, description="wall condition of the y = upper face")
    z_min: WallName = Field(WallKind.SEPARATE, description="wall condition of the z = lower face")
    z_max: WallName = Field(WallKind.SEPARATE, description="wall condition of the z = upper face")


class Floor(Section):
    enabled: bool = Field(False, description="add a floor plane {x : normal . x = height}")
    normal: Vec3 = Field([0.0, 1.0, 0.0], description="floor normal, pointing into the free space")
    height: float = Field(
        0.1, description="offset of the plane along the normal [m] (the grid holds the node row nearest it and all below)"
    )
    friction: Annotated[float, Field(ge=0.0)] = Field(0.5, description="Coulomb friction coefficient")


class SimConfig(Section):
    domain: Domain = Field(default_factory=Domain, description="the simulation box")
    grid_resolution: Annotated[Int, Field(ge=8, le=1024)] | None = Field(
        None, description="grid cells along the longest domain axis; null with dx null = 32"
    )
    dx: Positive | None = Field(None, description="grid spacing [m]; give this or grid_resolution, not both")
    boundary_cells: Annotated[Int, Field(ge=2, le=16)] = Field(
        3, description="width of the wall band [cells]: particles stay this far inside the domain, the walls hold the "
        "nodes on and outside that box (>= 3 for cubic B-splines)"
    )
    particles_per_cell: Annotated[Int, Field(ge=1, le=6)] = Field(
        2, description="particles per cell along each axis (ppc^3 per cell)"
    )
    jitter: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.0, description="random particle offset as a fraction of the particle spacing (seeded by optimize.seed)"
    )
    dt: Positive = Field(1.0e-3, description="time step [s]")
    steps: Annotated[Int, Field(ge=1, le=1_000_000)] = Field(50, description="simulation steps")
    bspline: BSplineName = Field(BSpline.QUADRATIC, description="transfer kernel (27 or 64 nodes)")
    gravity: Vec3 = Field([0.0, -9.81, 0.0], description="gravity [m/s^2]")
    initial_velocity: Vec3 = Field([0.0, 0.0, 0.0], description="initial velocity of the source [m/s]")
    boundaries: Boundaries = Field(
        default_factory=Boundaries,
        description="per face: sticky (v = 0), slip (normal v = 0) or separate (outward normal v = 0)",
    )
    floor: Floor = Field(default_factory=Floor, description="an optional floor plane with friction")
    control_stride: Annotated[Int, Field(ge=1)] = Field(
        10, description="steps between deformation-gradient control layers (K = ceil(steps / stride))"
    )
    segment_length: Annotated[Int, Field(ge=1)] | None = Field(
        None, description="steps per checkpoint segment in the backward pass; null = about sqrt(steps)"
    )
    frames: list[Annotated[Int, Field(ge=0)]] = Field(
        [], description="extra steps whose states are kept for per-frame losses and renders (the final step always is)"
    )
    cfl_limit: Positive = Field(0.5, description="refuse to run when dt sqrt((lambda + 2 mu) / rho) / dx exceeds this")

    @model_validator(mode="after")
    def _one_grid_size(self) -> SimConfig:
        if self.grid_resolution is not None and self.dx is not None:
            raise PydanticCustomError("grid_size", "give sim.grid_resolution or sim.dx, not both")
        return self


# ----------------------------------------------------------------------------------------------------------------
# learnable parameter groups


class LearnDFc(Section):
    enabled: bool = Field(False, description="learn the deformation-gradient controls: one log strain dFc [3, 3] per "
                          "particle and control layer; at the layer's step F <- exp(bounded dFc) F (sim/controls.py)")
    lr: Positive = Field(1.0e-2, description="learning rate")
    init_scale: Annotated[float, Field(ge=0.0)] = Field(0.0, description="std of the random initial dFc; 0 = zeros")
    max_strain: Annotated[float, Field(gt=0.0, le=5.0)] = Field(
        0.5, description="bound on the deviatoric log strain of one control layer (Frobenius norm)")
    max_volume_strain: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.0, description="bound on the volumetric log strain ln(det) / 3 of one control layer; 0 = volume-preserving "
        "controls (det F stays the true volume ratio, so mass cannot pile up unseen)")


class LearnE(Section):
    enabled: bool = Field(False, description="learn Young's modulus (optimised as log E)")
    lr: Positive = Field(5.0e-2, description="learning rate on log E")
    init: Positive | None = Field(None, description="starting value [Pa]; null = material.E")
    per_particle: bool = Field(False, description="one value per particle instead of one global value")


class LearnNu(Section):
    enabled: bool = Field(False, description="learn the Poisson ratio")
    lr: Positive = Field(1.0e-2, description="learning rate")
    init: Annotated[float, Field(gt=-1.0, lt=0.5)] | None = Field(None, description="starting value; null = material.nu")
    per_particle: bool = Field(False, description="one value per particle instead of one global value")


class LearnV0(Section):
    enabled: bool = Field(False, description="learn the initial velocity")
    lr: Positive = Field(1.0e-1, description="learning rate [m/s]")
    init: Vec3 | None = Field(None, description="starting value [m/s]; null = sim.initial_velocity")
    per_particle: bool = Field(False, description="one velocity per particle instead of one global velocity")


class LearnYieldStress(Section):
    enabled: bool = Field(False, description="learn the yield stress (von_mises, bingham; optimised as log)")
    lr: Positive = Field(5.0e-2, description="learning rate on log yield stress")
    init: Positive | None = Field(None, description="starting value [Pa]; null = material.yield_stress")
    per_particle: bool = Field(False, description="one value per particle instead of one global value")


class LearnFrictionAngle(Section):
    enabled: bool = Field(False, description="learn the friction angle (drucker_prager)")
    lr: Positive = Field(1.0, description="learning rate [degrees]")
    init: FrictionAngle | None = Field(None, description="starting value [degrees]; null = material.friction_angle")
    per_particle: bool = Field(False, description="one value per particle instead of one global value")


class LearnCohesion(Section):
    enabled: bool = Field(False, description="learn the cohesion c (drucker_prager; optimised as log c, so it starts "
                          "from a positive value: init, or material.cohesion > 0)")
    lr: Positive = Field(5.0e-2, description="learning rate on log cohesion")
    init: Positive | None = Field(None, description="starting value [Pa], > 0; null = material.cohesion")
    per_particle: bool = Field(False, description="one value per particle instead of one global value")


class LearnHardening(Section):
    enabled: bool = Field(False, description="learn snow's hardening coefficient xi (snow; optimised as log)")
    lr: Positive = Field(5.0e-2, description="learning rate on log xi")
    init: Positive | None = Field(None, description="starting value; null = material.hardening")
    per_particle: bool = Field(False, description="one value per particle instead of one global value")


class LearnViscosity(Section):
    enabled: bool = Field(False, description="learn the dynamic viscosity (newtonian_fluid, bingham; optimised as "
                          "log)")
    lr: Positive = Field(5.0e-2, description="learning rate on log viscosity")
    init: Positive | None = Field(None, description="starting value [Pa s]; null = material.viscosity")
    per_particle: bool = Field(False, description="one value per particle instead of one global value")


class LearnColor(Section):
    enabled: bool = Field(False, description="learn the Gaussians' colour")
    lr: Positive = Field(1.0e-2, description="learning rate")
    init: Color | None = Field(None, description="starting RGB in [0, 1]; null = appearance.color")
    per_gaussian: bool = Field(False, description="one colour per Gaussian instead of one global colour")


class LearnOpacity(Section):
    enabled: bool = Field(False, description="learn the Gaussians' opacity (optimised as a logit)")
    lr: Positive = Field(5.0e-2, description="learning rate on the logit")
    init: Annotated[float, Field(gt=0.0, lt=1.0)] | None = Field(None, description="starting opacity; null = appearance")
    per_gaussian: bool = Field(False, description="one opacity per Gaussian instead of one global opacity")


class LearnSigma0(Section):
    enabled: bool = Field(False, description="learn the rest size sigma0 of the Gaussians (optimised as log)")
    lr: Positive = Field(1.0e-2, description="learning rate on log sigma0")
    init: Positive | None = Field(None, description="starting value [m]; null = appearance.sigma0")


class LearnConfig(Section):
    dFc: LearnDFc = Field(default_factory=LearnDFc, description="deformation-gradient controls")
    E: LearnE = Field(default_factory=LearnE, description="Young's modulus")
    nu: LearnNu = Field(default_factory=LearnNu, description="Poisson ratio")
    v0: LearnV0 = Field(default_factory=LearnV0, description="initial velocity")
    yield_stress: LearnYieldStress = Field(default_factory=LearnYieldStress,
                                           description="yield stress (von_mises, bingham)")
    friction_angle: LearnFrictionAngle = Field(default_factory=LearnFrictionAngle,
                                               description="friction angle (drucker_prager)")
    cohesion: LearnCohesion = Field(default_factory=LearnCohesion, description="cohesion (drucker_prager)")
    viscosity: LearnViscosity = Field(default_factory=LearnViscosity,
                                      description="viscosity (newtonian_fluid, bingham)")
    hardening: LearnHardening = Field(default_factory=LearnHardening, description="hardening coefficient (snow)")
    color: LearnColor = Field(default_factory=LearnColor, description="colour")
    opacity: LearnOpacity = Field(default_factory=LearnOpacity, description="opacity")
    sigma0: LearnSigma0 = Field(default_factory=LearnSigma0, description="Gaussian rest size")


# ----------------------------------------------------------------------------------------------------------------
# appearance and rendering


class AppearanceConfig(Section):
    gaussians: Literal["surface", "particle"] = Field(
        "surface", description="surface: Gaussians embedded on the rest surface; particle: one per particle"
    )
    surface_samples: Annotated[Int, Field(ge=1, le=10_000_000)] = Field(
        5000, description="number of surface Gaussians M (surface mode, blue-noise samples); also the metric "
        "surface samples"
    )
    neighbors: Annotated[Int, Field(ge=1, le=32)] = Field(8, description="particles each surface Gaussian follows (k)")
    sigma0: Positive | None = Field(None, description="rest size of a Gaussian [m]; null = from the particle spacing")
    thickness_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.1, description="surface discs: thickness along the normal relative to sigma0"
    )
    color: Color = Field([0.9, 0.55, 0.25], description="RGB in [0, 1]")
    opacity: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(0.9, description="opacity in (0, 1)")


Fov = Annotated[float, Field(ge=1e-3, lt=180.0)]  # degrees; below 0.001 the focal length overflows


class OrbitRig(Section):
    """Cameras on a circle around `target`, one per azimuth, all looking at `target`."""

    type: Literal["orbit"]
    name: str = Field("orbit", description="cameras are named <name><i>")
    azimuths: list[float] = Field([0.0, 90.0, 180.0, 270.0], min_length=1, description="azimuths [deg]")
    elevation: Annotated[float, Field(gt=-90.0, lt=90.0)] = Field(20.0, description="elevation above the horizon [deg]")
    radius: Positive = Field(2.0, description="distance to the target [m]")
    fov: Fov = Field(40.0, description="vertical field of view [deg], 0.001 <= fov < 180")
    target: Vec3 | None = Field(None, description="point looked at [m]; null = the domain's centre")
    up: Vec3 = Field([0.0, 1.0, 0.0], description="world up; azimuth 0 looks from the side most along +z")


class PinholeCamera(Section):
    """One camera: intrinsics from `fov` or `K`; pose from eye/target/up or `world_to_camera` (OpenCV frame)."""

    type: Literal["pinhole"]
    name: str = Field(description="unique camera name (target images refer to it)")
    fov: Fov | None = Field(None, description="vertical field of view [deg], 0.001 <= fov < 180")
    K: Mat3 | None = Field(None, description="intrinsics [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] in pixels")
    eye: Vec3 | None = Field(None, description="camera position [m]")
    target: Vec3 | None = Field(None, description="point looked at [m]; null = the domain's centre")
    up: Vec3 = Field([0.0, 1.0, 0.0], description="world up")
    world_to_camera: Mat4 | None = Field(
        None, description="4x4 world-to-camera matrix (OpenCV: x right, y down, z forward); instead of eye/target"
    )


class CaptureRig(Section):
    """Cameras of a real capture (docs/CAPTURES.md): a COLMAP sparse model folder (text or binary), a nerfstudio /
    Blender transforms.json or an INRIA 3DGS cameras.json. Each camera is named after its image file (without folder
    or extension, after `prefix`); its intrinsics are scaled from the capture's image size to render.width x
    render.height (the aspect ratios must agree within a pixel). Cameras with lens distortion are refused."""

    type: Literal["capture"]
    path: str = Field(description="COLMAP model folder (e.g. sparse/0) or a .json camera file, relative to the "
                      "scene file (resolved to an absolute path on load)")
    format: Literal["auto", "colmap", "transforms", "inria"] = Field(
        "auto", description="auto: a folder is COLMAP, a JSON list is INRIA cameras.json, a JSON object with frames "
        "is transforms.json (OpenGL camera-to-world, converted to OpenCV; camera_angle_x is horizontal)")
    select: list[str] | None = Field(None, min_length=1, description="names of the cameras to use (image file names "
                                     "without extension); null = all of them")
    prefix: str = Field("", description="prepended to every camera name (two captures in one scene)")
    world_from_capture: Mat4 | None = Field(
        None, description="4x4 similarity (uniform scale x rotation, translation) taking the capture's coordinates "
        "to the scene's [m]; null = the capture's coordinates are the scene's")


Camera = Annotated[Union[OrbitRig, PinholeCamera, CaptureRig], Field(discriminator="type")]


class RenderConfig(Section):
    width: Annotated[Int, Field(ge=8, le=8192)] = Field(64, description="image width [px]")
    height: Annotated[Int, Field(ge=8, le=8192)] = Field(64, description="image height [px]")
    background: Color = Field([1.0, 1.0, 1.0], description="background RGB in [0, 1]")
    rasterize_mode: Literal["classic", "antialiased"] = Field(
        "antialiased", description="gsplat's modes: classic dilates every footprint by 0.3 px^2; antialiased also "
        "scales opacity by the dilation's area ratio, so surface discs seen edge-on do not grow a pixel-wide rim")
    near: Positive = Field(0.01, description="near clipping depth [m]")
    far: Positive = Field(100.0, description="far clipping depth [m]")
    cameras: list[Camera] = Field(
        default_factory=lambda: [OrbitRig(type="orbit")], min_length=1,
        description="camera rigs (orbit, pinhole or capture)"
    )


# ----------------------------------------------------------------------------------------------------------------
# losses, optimiser, outputs

Weight = Annotated[float, Field(ge=0.0)]


class LossConfig(Section):
    grid_mass: Weight = Field(1.0, description="log grid-mass loss against the target mesh (needs target.mesh)")
    silhouette: Weight = Field(1.0, description="alpha loss against target silhouettes")
    silhouette_kind: Literal["l1", "bce"] = Field("l1", description="silhouette loss form")
    rgb_l1: Weight = Field(0.0, description="L1 on RGB")
    dssim: Weight = Field(0.0, description="D-SSIM on RGB")
    depth_l1: Weight = Field(0.0, description="L1 on expected depth (needs a target mesh or truth)")
    volume: Weight = Field(0.0, description="volume preservation: mean of (ln det F)^2 over particles and kept frames "
                           "(charges compression that piles mass into few cells, and expansion)")
    dFc_l2: Weight = Field(0.0, description="regulariser: mean squared dFc")
    dFc_smooth: Weight = Field(0.0, description="regulariser: squared differences of consecutive dFc layers")


class Schedule(Section):
    kind: Literal["constant", "cosine", "exponential"] = Field("constant", description="learning-rate schedule")
    final_factor: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.1, description="learning rate at the last iteration relative to the first (cosine, exponential)"
    )
    warmup: Annotated[Int, Field(ge=0)] = Field(0, description="iterations of linear warm-up")


class LineSearch(Section):
    enabled: bool = Field(False, description="backtracking: accept a step only if the loss is finite and lower")
    shrink: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(0.5, description="step shrink factor per retry")
    max_tries: Annotated[Int, Field(ge=1, le=20)] = Field(4, description="retries before giving up on an iteration")
    require_valid: bool = Field(True, description="from a physically valid state, also reject a step whose state is "
                                "not (an inverted particle, or more than 1 % of particles in cells above 4x rest)")


class OptimizeConfig(Section):
    iterations: Annotated[Int, Field(ge=0)] = Field(50, description="optimisation iterations")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="torch.optim optimiser")
    schedule: Schedule = Field(default_factory=Schedule, description="learning-rate schedule")
    grad_clip: Positive | None = Field(None, description="clip the global gradient norm; null = off")
    line_search: LineSearch = Field(default_factory=LineSearch, description="optional backtracking line search")
    episodes: Annotated[Int, Field(ge=1)] = Field(
        1, description="episodes of optimize.iterations each; episode k + 1 starts from episode k's final state "
        "(x, v, F, C) with fresh controls (targets of the final state only)"
    )
    checkpoint_every: Annotated[Int, Field(ge=1)] = Field(10, description="iterations between checkpoints")
    keep_checkpoints: Annotated[Int, Field(ge=1)] = Field(3, description="latest checkpoints kept (plus the best)")
    render_every: Annotated[Int, Field(ge=0)] = Field(10, description="iterations between renders; 0 = never")
    seed: Annotated[Int, Field(ge=0, le=INT64_MAX)] = Field(
        0, description="seed of every random choice (jitter, probes, init); 0 <= seed < 2^63")


class EvaluateConfig(Section):
    size: Annotated[Int, Field(ge=16, le=2048)] = Field(
        256, description="results are judged against the exact target mesh's silhouettes at size x size pixels, "
        "from 12 views around the first orbit rig's target (8 azimuths at 15 deg, 4 at 50 deg)")


def _inside_runs(value: Any) -> Any:
    """output.dir stays inside runs/: a relative path without '..' (a scene file cannot send outputs elsewhere)."""
    if isinstance(value, str):
        parts = PurePosixPath(value).parts
        if not parts or value.startswith(("/", "~")) or ".." in parts or "\0" in value:
            raise PydanticCustomError("output_dir", "must be a relative folder inside runs/ without '..' (a scene "
                                      "file cannot write elsewhere; use --out for that), got {value}",
                                      {"value": repr(value[:60])})
    return value


class OutputConfig(Section):
    dir: Annotated[str, AfterValidator(_inside_runs)] | None = Field(
        None, description="output folder inside runs/ (relative, no '..'); null = runs/<scene>-<timestamp>; only "
        "--out on the command line writes elsewhere")
    turntable_frames: Annotated[Int, Field(ge=0, le=720)] = Field(36, description="views in turntable.gif; 0 = none")
    video: Literal["gif", "mp4", "both"] = Field("gif", description="turntable format (mp4 needs an ffmpeg writer)")
    up_axis: Literal["y", "z", "-y"] = Field(
        "y", description="up axis of the exported splats and cameras.json (the simulation is y-up): y as simulated; z "
        "for Blender (z up); -y for the COLMAP / OpenCV convention of trained 3DGS scenes, as SuperSplat shows them")
    frame_plys: bool = Field(True, description="write final/frames/frame_<step>.ply: the Gaussians of every kept "
                             "frame (an animated splat sequence)")


# ----------------------------------------------------------------------------------------------------------------
# the scene


class Scene(Section):
    """A whole scene file."""

    name: str | None = Field(None, description="scene name; null = the file's stem")
    source: Source = Field(description="the object that is simulated: a shape, or a trained 3DGS scene (gaussians)")
    target: TargetConfig = Field(description="what the result is compared with: a mesh, images and/or truth")
    material: MaterialConfig = Field(default_factory=MaterialConfig, description="constitutive model and parameters")
    sim: SimConfig = Field(default_factory=SimConfig, description="MPM grid, particles, time stepping, walls")
    learn: LearnConfig = Field(default_factory=LearnConfig, description="which parameter groups are optimised")
    appearance: AppearanceConfig = Field(default_factory=AppearanceConfig, description="the Gaussians drawn")
    render: RenderConfig = Field(default_factory=RenderConfig, description="image size, background, cameras")
    loss: LossConfig = Field(default_factory=LossConfig, description="weights of the loss terms")
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig, description="optimiser and run control")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="how a result is judged at the end")
    output: OutputConfig = Field(default_factory=OutputConfig, description="what is written where")
