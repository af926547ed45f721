"""Input hardening (issue #12): every refused input is one `error: key.path: problem` line on stderr, exit 2, fast,
with nothing written; YAML is read as YAML 1.2 with bounded size; no traceback from any of the probe's findings.

Each test reproduces one finding of the issue on a small or shipped scene, through the CLI (Typer's CliRunner).
"""

from __future__ import annotations

import copy
import os
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import pytest
import typer
import yaml
from conftest import BASE_SCENE, REPO
from PIL import Image
from typer.testing import CliRunner

from diffmpm_cli.cli import app
from diffmpm_cli.cli.common import handle_errors
from diffmpm_cli.config import load_scene
from diffmpm_cli.errors import AssetError, ConfigError

runner = CliRunner()
SNOWMAN = REPO / "scenes" / "sphere_to_snowman.yaml"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def refused(result, key: str | None = None, fragment: str | None = None) -> str:
    """The one error line of a refused command (exit 2, nothing else on stderr, no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr, repr(result.exception))
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    if key is not None:
        assert lines[0].startswith(f"error: {key}: "), lines[0]
    if fragment is not None:
        assert fragment in lines[0], lines[0]
    return lines[0]


def scene_file(tmp_path: Path, data, name: str = "scene.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def snowman_text() -> str:
    return SNOWMAN.read_text()


# ---------------------------------------------------------------------------------------------------------------
# denial of service


ALIAS_BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
source: *i
"""


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    start = time.perf_counter()
    line = refused(invoke("validate", scene_file(tmp_path, ALIAS_BOMB)), fragment="more than 100,000 values")
    assert time.perf_counter() - start < 3.0
    assert len(line) < 300


def test_yaml_nesting_is_bounded(tmp_path):
    deep = "x: " + "[" * 2000 + "]" * 2000 + "\n"
    refused(invoke("validate", scene_file(tmp_path, deep)), fragment="nested more than 64 levels")
    recursive = snowman_text() + "loop: &l [*l]\n"
    refused(invoke("validate", scene_file(tmp_path, recursive)), fragment="alias *l refers to a node that contains it")


def test_an_offending_value_is_never_printed_whole(tmp_path):
    data = copy.deepcopy(BASE_SCENE)
    data["sim"]["dt"] = [[i] * 100 for i in range(500)]  # 50,000 numbers where one is expected
    line = refused(invoke("validate", scene_file(tmp_path, data)), key="sim.dt", fragment="must be a number")
    assert len(line) < 200
    data["sim"]["dt"] = "x" * 100_000
    assert len(refused(invoke("validate", scene_file(tmp_path, data)), key="sim.dt")) < 200


def test_preview_with_a_narrow_field_of_view_finishes(tmp_path):
    for fov in (0.05, 0.01):
        out = tmp_path / f"preview{fov}"
        start = time.perf_counter()
        result = invoke("validate", scene_file(tmp_path, BASE_SCENE), "--preview", out,
                        "--set", f"render.cameras[1].fov={fov}")
        assert result.exit_code == 0, result.stderr
        assert time.perf_counter() - start < 20.0
        assert len(list(out.glob("preview_*.png"))) == 3


def test_particle_count_is_checked_before_the_lattice_exists(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the lattice was allocated before the particle count was checked")

    monkeypatch.setattr("diffmpm_cli.assets.lattice_particles", never)
    result = invoke("validate", SNOWMAN, "--set", "sim.grid_resolution=512", "--set", "sim.particles_per_cell=6")
    refused(result, key="source", fragment="would exceed the limit of 20,000,000")


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "huge", "binary"])
def test_scene_path_must_be_a_small_regular_text_file(tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "scene.fifo"
        os.mkfifo(path)  # opening it would block until a writer comes: it must not be opened
        fragment = "is not a regular file"
    elif kind == "device":
        path, fragment = Path("/dev/zero"), "is not a regular file"
    elif kind == "folder":
        path, fragment = tmp_path, "is not a regular file"
    elif kind == "huge":
        path = scene_file(tmp_path, snowman_text() + "#" * (2 << 20) + "\n")
        fragment = "larger than 1 MiB"
    else:
        path = tmp_path / "scene.yaml"
        path.write_bytes(b"name: \xff\xfe\n")
        fragment = "is not UTF-8 text"
    start = time.perf_counter()
    refused(invoke("validate", path), fragment=fragment)
    assert time.perf_counter() - start < 5.0


# ---------------------------------------------------------------------------------------------------------------
# pictures


def _chunks(png: bytes):
    pos = 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos:pos + 4])
        yield png[pos + 4:pos + 8], png[pos + 8:pos + 8 + length]
        pos += 12 + length


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def corrupt_png(path: Path, size=(32, 32)) -> Path:
    """A PNG whose chunks and checksums are all valid (Image.verify() passes) but whose pixel stream is corrupt."""
    Image.new("RGBA", size, (200, 40, 40, 255)).save(path)
    png = path.read_bytes()
    raw = bytearray(zlib.decompress(b"".join(body for kind, body in _chunks(png) if kind == b"IDAT")))
    raw[0] = 9  # no such row filter
    out = b"\x89PNG\r\n\x1a\n"
    for kind, body in _chunks(png):
        out += _chunk(kind, zlib.compress(bytes(raw)) if kind == b"IDAT" else body)
    path.write_bytes(out)
    return path


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A 370-byte PNG that claims side x side pixels."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * (side + 1) * 4, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b""))
    return path


def image_scene(tmp_path: Path, picture: Path) -> Path:
    data = copy.deepcopy(BASE_SCENE)
    data["target"]["images"] = [{"path": picture.name, "camera": "front"}]
    return scene_file(tmp_path, data)


def test_corrupt_picture_that_passes_verify_is_refused_by_validate_and_optimize(tmp_path, monkeypatch):
    picture = corrupt_png(tmp_path / "pic.png")
    with Image.open(picture) as img:
        img.verify()  # what validate used to check
    scene = image_scene(tmp_path, picture)
    refused(invoke("validate", scene), key="target.images[0].path", fragment="not a readable image")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    refused(invoke("optimize", scene, "--iters", "0"), key="target.images[0].path")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    from diffmpm_cli.optimize.targets import load_target_image

    with pytest.raises(AssetError, match="not a readable image"):  # the optimiser reads pictures the same way
        load_target_image(str(picture), background=None)


def test_decompression_bomb_picture_is_refused(tmp_path):
    scene = image_scene(tmp_path, bomb_png(tmp_path / "pic.png"))
    refused(invoke("validate", scene), key="target.images[0].path", fragment="too large")
    scene = image_scene(tmp_path, bomb_png(tmp_path / "pic.png", side=9000))  # above 8192^2, below Pillow's limits
    refused(invoke("validate", scene), key="target.images[0].path", fragment="more than the largest render")


# ---------------------------------------------------------------------------------------------------------------
# tracebacks that became one line, each on the shipped default scene


@pytest.mark.parametrize(
    "overrides,key,fragment",
    [
        (["name={? [a, b]: 1}"], "--set name", "a key must be a name, not a list or mapping"),
        (["sim.dt=!!float abc"], "--set sim.dt", "cannot read 'abc' as a number"),
        (["sim.dt=!!bool maybe"], "--set sim.dt", "cannot read this scalar as !!bool"),
        (["sim.gravity=!!map [1]"], "--set sim.gravity", "!!map cannot tag a sequence"),
        ([f"sim.steps={'9' * 5000}"], "--set sim.steps", "an integer of 5000 digits is too long"),
        (["sim.grid_resolution=null", "sim.dx=5e-324"], "sim.dx", "far too small for the domain"),
        (["sim.domain={lower: [-1e308, -1e308, -1e308], upper: [1e308, 1e308, 1e308]}"], "sim.domain",
         "extents overflow"),
        (["source={shape: capsule, radius: 1e-9, height: 0.1}"], "source", "cannot be tessellated at this size"),
        (["source={shape: sphere, radius: 1e200}"], "source", "cannot be tessellated at this size"),
        (["material.density=1e300"], "material.density", "outside 1e-30..1e30"),
        ([f"optimize.seed={2**63}"], "optimize.seed", "must be <= 9223372036854775807"),
        (["render.cameras[0].fov=5e-324"], "render.cameras[0].fov", "must be >= 0.001"),
        (["sim.floor={enabled: true, normal: [1e308, 1e308, 0], height: -1}"], "sim.floor.normal",
         "finite length"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_former_tracebacks_are_one_line(overrides, key, fragment):
    args = [a for item in overrides for a in ("--set", item)]
    refused(invoke("validate", SNOWMAN, *args), key=key, fragment=fragment)


@pytest.mark.parametrize("kind", ["symlink loop", "NUL", "long name", "fifo", "folder"])
def test_bad_mesh_paths_are_refused_by_key(tmp_path, kind):
    if kind == "symlink loop":
        (tmp_path / "a.obj").symlink_to(tmp_path / "b.obj")
        (tmp_path / "b.obj").symlink_to(tmp_path / "a.obj")
        name, fragment = "a.obj", "cannot open"
    elif kind == "NUL":
        name, fragment = "a\0b.obj", "NUL character"
    elif kind == "long name":
        name, fragment = "m" * 300 + ".obj", "File name too long"
    elif kind == "fifo":
        os.mkfifo(tmp_path / "pipe.obj")
        name, fragment = "pipe.obj", "not a regular file"
    else:
        name, fragment = ".", "not a regular file"
    data = copy.deepcopy(BASE_SCENE)
    data["source"] = {"shape": "mesh", "path": name, "size": 0.3}
    refused(invoke("validate", scene_file(tmp_path, data)), key="source.path", fragment=fragment)


def test_seed_beyond_int64_is_refused_by_validate_as_by_the_run():
    refused(invoke("validate", SNOWMAN, "--set", f"optimize.seed={2**63}"), key="optimize.seed")
    assert invoke("validate", SNOWMAN, "--set", f"optimize.seed={2**63 - 1}").exit_code == 0


def test_preview_onto_a_file_or_under_a_file_writes_nothing(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("mine")
    scene = scene_file(tmp_path, BASE_SCENE)
    refused(invoke("validate", scene, "--preview", blocker), key="--preview", fragment="is not a folder")
    refused(invoke("validate", scene, "--preview", blocker / "sub"), key="--preview", fragment="is not a folder")
    assert blocker.read_text() == "mine"


def test_preview_of_a_refused_scene_writes_nothing(tmp_path):
    out = tmp_path / "preview"
    refused(invoke("validate", scene_file(tmp_path, BASE_SCENE), "--preview", out, "--set", "sim.dt=0.05"),
            key="sim.dt", fragment="unstable time step")
    assert not out.exists()


def test_preview_names_cannot_leave_the_folder(tmp_path):
    data = copy.deepcopy(BASE_SCENE)
    data["render"]["cameras"] = [{"type": "pinhole", "name": "../../escape", "fov": 35, "eye": [0.5, 0.6, 2.0]}]
    out = tmp_path / "a" / "b" / "preview"
    result = invoke("validate", scene_file(tmp_path, data), "--preview", out)
    assert result.exit_code == 0, result.stderr
    assert [p.name for p in out.iterdir()] == ["preview_escape.png"]
    assert not list(tmp_path.glob("**/escape*"))


def test_render_frames_with_brackets_is_printed_as_given(tmp_path):
    line = refused(invoke("render", scene_file(tmp_path, BASE_SCENE), "--frames", "[/x]"), key="--frames")
    assert "[/x]" in line


# ---------------------------------------------------------------------------------------------------------------
# YAML 1.2 and the schema's strictness


@pytest.mark.parametrize(
    "override,key,fragment",
    [
        ("sim.dt=true", "sim.dt", "must be a number, got true"),
        ("sim.steps=true", "sim.steps", "must be an integer, got true"),
        ("sim.dt='1e-3'", "sim.dt", "must be a number, got '1e-3'"),
        ("learn.dFc.enabled=1", "learn.dFc.enabled", "must be true or false"),
        ("learn.dFc.enabled=yes", "learn.dFc.enabled", "must be true or false, got 'yes'"),  # YAML 1.1's boolean
        ("sim.steps=010", "--set sim.steps", "leading zero, which YAML 1.1 reads as octal"),
        ("sim.steps=1:30", "sim.steps", "must be an integer, got '1:30'"),  # YAML 1.1's sexagesimal 90
        ("sim.gravity=!!set {1, 2, 3}", "--set sim.gravity", "!!set is not allowed"),
        ("target.truth={}", "target.truth", "gives no value"),
    ],
)
def test_yaml_1_2_and_strict_types(override, key, fragment):
    refused(invoke("validate", SNOWMAN, "--set", override), key=key, fragment=fragment)


def test_yaml_1_2_numbers_are_read_as_numbers(tmp_path):
    original = snowman_text()
    assert "steps: 30" in original and "dt: 2.0e-3" in original  # the shipped lines this test rewrites
    text = original.replace("steps: 30", "steps: 3e1").replace("dt: 2.0e-3", "dt: 2e-3")
    scene = load_scene(scene_file(tmp_path, text.replace("seed: 0", "seed: 0x10")))
    assert scene.sim.steps == 30 and scene.sim.dt == 2e-3 and scene.optimize.seed == 16
    assert load_scene(scene_file(tmp_path, text.replace("seed: 0", "seed: 0o17"))).optimize.seed == 15


def test_merge_keys_are_supported_and_own_keys_win(tmp_path):
    text = snowman_text().replace("sim:\n", "sim:\n  <<: {dt: 5.0e-4, steps: 40, bspline: cubic, boundary_cells: 3}\n", 1)
    scene = load_scene(scene_file(tmp_path, text))
    plain = load_scene(SNOWMAN)
    assert scene.sim.bspline == "cubic" and scene.sim.boundary_cells == 3  # merged
    assert scene.sim.dt == plain.sim.dt and scene.sim.steps == plain.sim.steps  # the mapping's own keys win
    bad = snowman_text().replace("sim:\n", "sim:\n  <<: 5\n", 1)
    refused(invoke("validate", scene_file(tmp_path, bad)), fragment="expected a mapping or list of mappings for merging")


def test_duplicate_keys_are_still_refused_beside_merge_keys(tmp_path):
    text = snowman_text().replace("sim:\n", "sim:\n  <<: {dt: 5.0e-4}\n  steps: 10\n", 1)
    refused(invoke("validate", scene_file(tmp_path, text)), fragment="duplicate key 'steps'")


# ---------------------------------------------------------------------------------------------------------------
# messages


def _one_command_app(command) -> typer.Typer:
    small = typer.Typer()
    small.command()(handle_errors(command))
    return small


def test_bracketed_text_survives_rich():
    def needs_ffmpeg() -> None:
        raise ConfigError("--format", "mp4 needs imageio-ffmpeg (pip install imageio[ffmpeg]); use gif")

    result = runner.invoke(_one_command_app(needs_ffmpeg), [])
    assert result.stderr.strip() == "error: --format: mp4 needs imageio-ffmpeg (pip install imageio[ffmpeg]); use gif"
    line = refused(invoke("validate", SNOWMAN, "--set", "sim.dt='[bold]x[/bold] [/]'"), key="sim.dt")
    assert "'[bold]x[/bold] [/]'" in line


def test_warnings_do_not_come_before_the_error_line():
    def warns_then_refuses() -> None:
        warnings.warn("overflow encountered in multiply", RuntimeWarning, stacklevel=1)
        raise ConfigError("source", "refused")

    result = runner.invoke(_one_command_app(warns_then_refuses), [])
    assert result.exit_code == 2 and result.stderr.strip() == "error: source: refused"

    def warns_and_succeeds() -> None:
        warnings.warn("kept for a command that succeeds", UserWarning, stacklevel=1)

    with pytest.warns(UserWarning, match="kept for a command that succeeds"):  # shown once the command is done
        assert runner.invoke(_one_command_app(warns_and_succeeds), []).exit_code == 0
    # a real one, in a real process (pytest would capture the warnings): trimesh's tessellation overflows (numpy
    # RuntimeWarnings on stderr) before the shape is refused
    command = [sys.executable, "-m", "diffmpm_cli", "validate", str(SNOWMAN), "--set",
               "source={shape: box, size: [1e200, 1e200, 1e200]}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: source: cannot be tessellated at this size: its triangles "
                                                "collapse or its coordinates under- or overflow (sizes of 1e-4..1e6 m "
                                                "are safe)"], done.stderr


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["validate", SNOWMAN, "--foo"], "No such option: --foo (see 'diffmpm validate --help')"),
        (["validate"], "Missing argument 'scene' (see 'diffmpm validate --help')"),
        (["optimize", SNOWMAN, "--iters", "-1"], "Invalid value for '--iters'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["bench", "mpm", "--nope"], "No such option: --nope"),
    ],
    ids=["unknown option", "missing argument", "bad value", "unknown command", "subcommand"],
)
def test_usage_errors_are_one_error_line(args, fragment):
    result = runner.invoke(app, [str(a) for a in args], prog_name="diffmpm")
    line = refused(result)
    assert fragment in line and "╭" not in result.stderr


def test_help_and_version_still_work():
    assert invoke("--version").exit_code == 0
    result = invoke("validate", "--help")
    assert result.exit_code == 0 and "Examples" in result.stdout


@pytest.mark.parametrize(
    "camera,key",
    [
        ({"type": "orbit", "radius": 1e-12}, "render.cameras[0].radius"),
        ({"type": "orbit", "elevation": 89.99999999}, "render.cameras[0].elevation"),
        ({"type": "orbit", "up": [1e308, 1e308, 1e308]}, "render.cameras[0].up"),
        ({"type": "orbit", "target": [1e200, 1e200, 1e200]}, "render.cameras[0].target"),
        ({"type": "pinhole", "name": "p", "fov": 30, "eye": [0.5, 0.5, 0.5], "target": [0.5, 0.5, 0.5]},
         "render.cameras[0].target"),
        ({"type": "pinhole", "name": "p", "fov": 30, "eye": [0.5, 0.5, 2.0], "up": [0, 0, 1]}, "render.cameras[0].up"),
    ],
    ids=["orbit radius", "orbit elevation", "orbit up", "orbit target", "pinhole target", "pinhole up"],
)
def test_camera_errors_name_the_key_that_fixes_them(tmp_path, camera, key):
    data = copy.deepcopy(BASE_SCENE)
    data["render"]["cameras"] = [camera]
    refused(invoke("validate", scene_file(tmp_path, data)), key=key)


def test_cfl_message_prints_enough_digits(tmp_path):
    from diffmpm_cli.sim.grid import wave_speed

    dt = 0.5 * (1 / 16) / wave_speed(2.0e4, 0.3, 1000.0) * (1 + 1e-7)  # CFL 0.5000001 on the 16^3 base scene
    line = refused(invoke("validate", scene_file(tmp_path, BASE_SCENE), "--set", f"sim.dt={dt!r}"), key="sim.dt")
    assert "CFL number 0.5000001 exceeds sim.cfl_limit 0.5" in line
    stable = float(line.split("dt <= ")[1].split(" s")[0])
    assert stable <= dt / (1 + 1e-7)  # the dt it names is stable (rounded down, not to nearest)


def test_frozen_heap_hands_objects_back():
    """A run freezes what exists at its start out of full collections and hands it back when it ends."""
    import gc

    from diffmpm_cli.heap import frozen_heap
    from diffmpm_cli.optimize.run import process_state

    before = gc.get_freeze_count()
    with process_state(device="cpu", seed=0):
        assert gc.get_freeze_count() > before
    assert gc.get_freeze_count() == before
    with frozen_heap():
        frozen = gc.get_freeze_count()
        with frozen_heap():  # nested: the outer block still holds its objects frozen after the inner one ends
            pass
        assert gc.get_freeze_count() >= frozen
    assert gc.get_freeze_count() == before
