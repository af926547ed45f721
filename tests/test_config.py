"""Scene schema and loader: valid scenes load, malformed ones fail with a key path, round trips, overrides."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import trimesh
import yaml
from conftest import BASE_SCENE, REPO, SCENES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffmpm_cli.assets import build_assets
from diffmpm_cli.config import apply_overrides, dump_scene, load_scene, scene_from_dict
from diffmpm_cli.config.defaults import render_defaults
from diffmpm_cli.config.schema import Scene
from diffmpm_cli.errors import AssetError, ConfigError, DiffMPMError

DELETE = object()


def mutate(data: dict, path: str, value) -> dict:
    """Copy of ``data`` with ``path`` (dots, integer segments for list items) set to ``value`` or deleted."""
    data = copy.deepcopy(data)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = data
    for part in parents:
        node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize("path", SCENES, ids=lambda p: p.stem)
def test_shipped_scenes_load_and_round_trip(path: Path, tmp_path: Path):
    scene = load_scene(path)
    assert scene.name == path.stem
    resolved = tmp_path / "config.resolved.yaml"
    resolved.write_text(dump_scene(scene))
    again = load_scene(resolved)
    assert again == scene
    assert dump_scene(again) == dump_scene(scene)


def test_there_are_at_least_three_example_scenes():
    assert len(SCENES) >= 3


def test_defaults_file_is_current_and_valid(tmp_path: Path):
    shipped = (REPO / "configs" / "defaults.yaml").read_text()
    assert shipped == render_defaults(), "configs/defaults.yaml is stale: run `make defaults`"
    scene = load_scene(REPO / "configs" / "defaults.yaml")
    example = Scene.model_validate(yaml.safe_load(shipped))
    example.name = "defaults"
    assert scene == example


def _leaf_paths(model_cls, prefix=""):
    for name, field in model_cls.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and hasattr(sub, "model_fields"):
            yield from _leaf_paths(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_defaults_file_documents_every_key():
    data = yaml.safe_load((REPO / "configs" / "defaults.yaml").read_text())
    text = (REPO / "configs" / "defaults.yaml").read_text()
    for path in _leaf_paths(Scene):
        node = data
        for part in path.split("."):
            assert part in node, f"{path} missing from configs/defaults.yaml"
            node = node[part]
    # every shape and camera kind is documented in comments
    for tag in (
        "sphere",
        "box",
        "torus",
        "capsule",
        "cylinder",
        "mesh",
        "union",
        "difference",
        "intersection",
        "orbit",
        "pinhole",
    ):
        assert f": {tag} - " in text


def test_base_scene_is_valid(base_scene, tmp_path):
    scene = scene_from_dict(base_scene, base_dir=tmp_path)
    assert scene.sim.grid_resolution == 16
    assert scene.render.cameras[1].name == "front"


# ----------------------------------------------------------------------------------------------------------------
# malformed scenes: (mutation path, value, expected key path, fragment of the message)

MALFORMED = [
    ("sim.dt", -1e-3, "sim.dt", "must be > 0"),
    ("sim.dt", float("inf"), "sim.dt", "finite"),
    ("sim.dt", float("nan"), "sim.dt", "finite"),
    ("simm", {}, "simm", "did you mean 'sim'"),
    ("sim.dtt", 1e-3, "sim.dtt", "did you mean 'dt'"),
    ("sim.steps", "many", "sim.steps", "must be an integer"),
    ("sim.steps", 2.5, "sim.steps", "must be an integer"),
    ("sim", 5, "sim", "must be a mapping"),
    ("sim.gravity", "down", "sim.gravity", "must be a list"),
    ("source.radius", -0.1, "source.radius", "must be > 0"),
    ("source", DELETE, "source", "required key missing"),
    ("source.shape", "sphear", "source.shape", "did you mean 'sphere'"),
    ("source.shape", DELETE, "source.shape", "required key missing"),
    ("source.center", [0.5, 0.5], "source.center", "exactly 3 items"),
    ("source.center", [0.1, 0.5, 0.5], "source", "outside the simulation interior"),
    ("source.radius", 2.0, "source", "outside the simulation interior"),
    ("material.nu", 0.5, "material.nu", "must be < 0.5"),
    ("material.E", 0, "material.E", "must be > 0"),
    ("material.model", "elastic", "material.model", "must be one of"),
    ("material.preset", "rubbber", "material.preset", "did you mean 'rubber'"),
    ("sim.bspline", "linear", "sim.bspline", "must be one of"),
    ("sim.boundaries.x_min", "bouncy", "sim.boundaries.x_min", "must be one of"),
    ("sim.control_stride", 50, "sim.control_stride", "must be <= sim.steps"),
    ("sim.frames.0", 99, "sim.frames[0]", "must be <= sim.steps"),
    ("sim.dx", 0.0625, "sim", "not both"),
    ("sim.domain", {"upper": [1.0, 0.7, 1.0]}, "sim.domain", "whole number of cells"),
    ("sim.domain", {"upper": [1.0, -1.0, 1.0]}, "sim.domain", "upper must exceed lower"),
    ("sim.boundary_cells", 1, "sim.boundary_cells", "must be >= 2"),
    ("sim.bspline", "cubic", "sim.boundary_cells", None),  # paired with boundary_cells: 2 below
    ("render.cameras.0.fov", 200, "render.cameras[0].fov", "must be < 180"),
    ("render.cameras", [], "render.cameras", "at least 1 items"),
    ("render.cameras.0.type", DELETE, "render.cameras[0].type", "required key missing"),
    ("render.cameras.1.eye", [0.5, 0.5, 0.5], "render.cameras[1].eye", "eye and target coincide"),
    ("render.cameras.1.fov", DELETE, "render.cameras[1]", "exactly one of fov and K"),
    ("render.cameras.1.target", [0.5, 0.6, 5.0], "render.cameras[1]", "does not look at the domain"),
    ("render.cameras.0.radius", 0.001, "render.cameras[0]", "does not look at the domain"),
    ("render.near", 200.0, "render.near", "must be < render.far"),
    ("appearance.color", [1.2, 0.0, 0.0], "appearance.color[0]", "must be <= 1"),
    ("target", {}, "target", "give a mesh, images or truth"),
    ("target", {"truth": {"E": 1e4}}, "loss.grid_mass", "needs target.mesh"),
    ("target.mesh.parts", [], "target.mesh.parts", "at least 1 items"),
    ("target.mesh.parts.0.radius", "big", "target.mesh.parts[0].radius", "must be a number"),
    ("target.images", [{"path": "nope.png", "camera": "front"}], "target.images[0].path", "file not found"),
    ("learn.E.init", -5.0, "learn.E.init", "must be > 0"),
    ("learn.dfc", {}, "learn.dfc", "did you mean 'dFc'"),
    ("loss.silhouette", -1.0, "loss.silhouette", "must be >= 0"),
    ("optimize.optimizer", "lbfgs", "optimize.optimizer", "must be one of"),
    ("source", {"shape": "torus", "major_radius": 0.1, "minor_radius": 0.2}, "source.minor_radius", "must be <"),
]


@pytest.mark.parametrize("path,value,key,fragment", MALFORMED, ids=[f"{m[0]}={m[1]!r}"[:40] for m in MALFORMED])
def test_malformed_scene_names_the_key(base_scene, tmp_path, path, value, key, fragment):
    data = mutate(base_scene, path, value)
    if path == "sim.bspline" and value == "cubic":
        data = mutate(data, "sim.boundary_cells", 2)
        fragment = "must be >= 3 with cubic"
    with pytest.raises(DiffMPMError) as info:  # values refused as the scene loads, geometry as its assets are built
        build_assets(scene_from_dict(data, base_dir=tmp_path))
    assert info.value.exit_code == 2
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{key}: "), first
    assert fragment in first, first


def test_at_least_25_malformed_cases():
    assert len({(m[0], repr(m[1])) for m in MALFORMED}) >= 25


def test_missing_unsupported_and_broken_mesh_files(base_scene, tmp_path):
    def load_with_source(source):  # a missing file is refused as the scene loads, a broken mesh as it is built
        return build_assets(scene_from_dict(mutate(base_scene, "source", source), base_dir=tmp_path))

    with pytest.raises(ConfigError, match=r"^source\.path: file not found"):
        load_with_source({"shape": "mesh", "path": "missing.obj"})
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(AssetError, match=r"^source\.path: unsupported mesh format '\.txt'"):
        load_with_source({"shape": "mesh", "path": "notes.txt"})
    (tmp_path / "garbage.stl").write_bytes(b"this is not a mesh at all")
    with pytest.raises(AssetError, match=r"^source\.path: "):
        load_with_source({"shape": "mesh", "path": "garbage.stl"})
    (tmp_path / "empty.obj").write_text("# nothing here\n")
    with pytest.raises(AssetError, match=r"^source\.path: .*(no triangles|cannot read)"):
        load_with_source({"shape": "mesh", "path": "empty.obj"})
    # an open sheet has no inside at all (a sphere with a hole now loads through the winding number: test_assets)
    sheet = trimesh.Trimesh(vertices=[[0, 0, 0], [0.2, 0, 0], [0, 0.2, 0.05]], faces=[[0, 1, 2]])
    sheet.export(tmp_path / "open.ply")
    with pytest.raises(AssetError, match=r"^source\.path: .*encloses no volume: it is not closed \(3 open edges in 1 "
                                          r"boundary loop\)"):
        load_with_source({"shape": "mesh", "path": "open.ply", "center": [0.5, 0.5, 0.5]})
    # a mesh part inside a union reports the part's key path
    with pytest.raises(ConfigError, match=r"^source\.parts\[1\]\.path: file not found"):
        load_with_source(
            {"shape": "union", "parts": [{"shape": "sphere", "radius": 0.1}, {"shape": "mesh", "path": "gone.stl"}]}
        )


def test_text_level_errors(write_scene):
    cases = {
        "": "is empty",
        "# only a comment\n": "is empty",
        "- a\n- b\n": "must hold a mapping",
        "sim: {dt: 1e-3\n": "YAML syntax error",
        "sim:\n  dt: 1.0e-3\n  dt: 2.0e-3\n": "duplicate key 'dt'",
        "source: !!python/object:os.system {}\n": "YAML syntax error",
    }
    for text, fragment in cases.items():
        with pytest.raises(ConfigError, match=fragment):
            load_scene(write_scene(text))
    with pytest.raises(ConfigError, match="scene file not found"):
        load_scene(Path("/nonexistent/scene.yaml"))


def test_overrides_are_typed_by_the_schema(write_scene):
    path = write_scene(BASE_SCENE)
    scene = load_scene(
        path,
        [
            "sim.dt=5e-4",
            "render.cameras[0].fov=25",
            "render.cameras.1.name=hero",
            "material.preset=rubber",
            "sim.frames=[5, 15]",
        ],
    )
    assert scene.sim.dt == pytest.approx(5e-4)
    assert scene.render.cameras[0].fov == 25
    assert scene.render.cameras[1].name == "hero"
    assert scene.material.model == "neo_hookean" and scene.material.E == 2.0e4  # explicit E beats the preset
    assert scene.sim.frames == [5, 15]
    with pytest.raises(ConfigError, match=r"^sim\.dt: must be > 0"):
        load_scene(path, ["sim.dt=-1"])
    with pytest.raises(ConfigError, match=r"^sim\.dtt: unknown key \(did you mean 'dt'\?\)"):
        load_scene(path, ["sim.dtt=1"])
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE"):
        load_scene(path, ["sim.dt"])
    with pytest.raises(ConfigError, match=r"index 7 out of range"):
        load_scene(path, ["render.cameras[7].fov=20"])
    with pytest.raises(ConfigError, match=r"is not a mapping"):
        load_scene(path, ["sim.dt.value=3"])


def test_apply_overrides_does_not_touch_its_input():
    data = {"sim": {"dt": 1.0}}
    out = apply_overrides(data, ["sim.dt=2", "loss.rgb_l1=0.5"])
    assert data == {"sim": {"dt": 1.0}}
    assert out == {"sim": {"dt": 2}, "loss": {"rgb_l1": 0.5}}


def test_material_preset_fills_missing_keys(base_scene, tmp_path):
    presets = yaml.safe_load((REPO / "configs" / "materials.yaml").read_text())
    scene = scene_from_dict(mutate(base_scene, "material", {"preset": "foam"}), base_dir=tmp_path)
    assert scene.material.E == float(presets["foam"]["E"])
    assert scene.material.density == float(presets["foam"]["density"])


def test_relative_paths_resolve_against_the_scene_file(base_scene, tmp_path):
    (tmp_path / "meshes").mkdir()
    trimesh.creation.box(extents=[0.2, 0.2, 0.2]).export(tmp_path / "meshes" / "cube.obj")
    data = mutate(base_scene, "source", {"shape": "mesh", "path": "meshes/cube.obj", "center": [0.5, 0.5, 0.5]})
    scene = scene_from_dict(data, base_dir=tmp_path)
    assert scene.source.path == str((tmp_path / "meshes" / "cube.obj").resolve())


# ----------------------------------------------------------------------------------------------------------------
# property: any mutation of a valid scene gives a valid scene or a ConfigError, never another exception


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


ALL_PATHS = [p for p in _paths(BASE_SCENE) if p]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.floats(-2, 2), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.sampled_from([0, -1, 1e-9, 1e9, 0.5, "sphere", "orbit", [0.5, 0.5, 0.5], [], {}]),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(ALL_PATHS),
    action=st.sampled_from(["set", "delete", "add"]),
    value=VALUES,
    key=st.text(min_size=1, max_size=6),
)
def test_mutations_raise_only_config_errors(tmp_path, path, action, value, key):
    data = copy.deepcopy(BASE_SCENE)
    node = data
    for part in path[:-1]:
        node = node[part]
    last = path[-1]
    if action == "delete":
        del node[last]
    elif action == "add" and isinstance(node[last], dict):
        node[last][key] = value
    else:
        node[last] = value
    try:
        scene = scene_from_dict(data, base_dir=tmp_path)
    except ConfigError as exc:
        assert str(exc).strip(), "a ConfigError must say what is wrong"
        return
    assert isinstance(scene, Scene)


@pytest.mark.parametrize("name", ["1e3", "010", "0o7", "0x10", "yes", "1:30", "true", "null", "~", ".5", "2001-12-14",
                                  "<<", "-.inf"])
def test_resolved_config_keeps_strings_that_look_like_other_types(tmp_path, name):
    """A name YAML 1.2 (this loader) or YAML 1.1 (yaml.safe_load) would read as a number, boolean, date or null is
    quoted in config.resolved.yaml, so a resumed run loads the same scene."""
    scene = load_scene(REPO / "scenes" / "sphere_to_snowman.yaml")
    scene.name = name
    resolved = tmp_path / "config.resolved.yaml"
    resolved.write_text(dump_scene(scene))
    assert load_scene(resolved) == scene
    assert yaml.safe_load(resolved.read_text())["name"] == name
