"""The command line through Typer's CliRunner: exit codes, one-line messages, no tracebacks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BASE_SCENE, SCENES
from PIL import Image
from typer.testing import CliRunner

from diffmpm_cli import __version__
from diffmpm_cli.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"diffmpm {__version__}"


@pytest.mark.parametrize("command", ["validate", "info", "check-grad", "optimize", "render"])
def test_every_command_has_help_with_examples(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Examples" in result.stdout and f"diffmpm {command}" in result.stdout


def test_top_level_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("validate", "info", "check-grad", "optimize", "render", "bench"):
        assert command in result.stdout


@pytest.mark.parametrize("scene", SCENES, ids=lambda p: p.stem)
def test_validate_accepts_every_shipped_scene(scene):
    result = invoke("validate", scene)
    assert result.exit_code == 0, result.stderr
    assert "source particles" in result.stdout and "CFL number" in result.stdout
    assert "scene is valid" in result.stdout


def test_validate_json_report(write_scene):
    result = invoke("validate", write_scene(BASE_SCENE), "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["grid_shape"] == [16, 16, 16]
    assert report["source_particles"] > 200 and report["target_particles"] > 200
    assert report["cfl_ok"] is True
    assert report["memory_checkpointed"] < report["memory_full_tape"]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--set", "sim.dt=-1e-3"], "sim.dt: must be > 0, got -0.001"),
        (["--set", "sim.dtt=1"], "sim.dtt: unknown key (did you mean 'dt'?)"),
        (["--set", "source.shape=cube"], "source.shape: unknown shape 'cube'"),
        (["--set", "source.center=[0.05, 0.5, 0.5]"], "source: extends outside the simulation interior"),
        (["--set", "sim.dt"], "--set sim.dt: expected KEY=VALUE"),
    ],
)
def test_validate_rejects_bad_input_with_exit_2(write_scene, args, expected):
    result = invoke("validate", write_scene(BASE_SCENE), *args)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {expected}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr + result.stdout


def test_validate_missing_file_and_bad_yaml(write_scene, tmp_path):
    result = invoke("validate", tmp_path / "absent.yaml")
    assert result.exit_code == 2 and "scene file not found" in result.stderr
    result = invoke("validate", write_scene("sim: [1, 2\n"))
    assert result.exit_code == 2 and "YAML syntax error" in result.stderr
    assert "Traceback" not in result.stderr


def test_unstable_time_step_is_refused_with_a_stable_dt(write_scene):
    result = invoke("validate", write_scene(BASE_SCENE), "--set", "material.E=1e8", "--set", "sim.dt=1e-3")
    assert result.exit_code == 2
    assert "CFL number" in result.stdout  # the table still shows where it went wrong
    line = result.stderr.strip()
    assert line.startswith("error: sim.dt: unstable time step: CFL number") and "would be stable" in line
    stable = float(line.split("dt <= ")[1].split(" s")[0])
    ok = invoke("validate", write_scene(BASE_SCENE), "--set", "material.E=1e8", "--set", f"sim.dt={stable * 0.99}")
    assert ok.exit_code == 0, ok.stderr


def test_validate_preview_writes_pictures(write_scene, tmp_path):
    out = tmp_path / "preview"
    result = invoke("validate", write_scene(BASE_SCENE), "--preview", out)
    assert result.exit_code == 0, result.stderr
    pictures = sorted(out.glob("*.png"))
    assert [p.name for p in pictures] == ["preview_front.png", "preview_orbit0.png", "preview_orbit1.png"]
    with Image.open(pictures[0]) as img:
        assert img.size == (2 * 256, 256)  # source | target, scaled up from 32x32
        pixels = [tuple(p) for p in np.asarray(img.convert("RGB")).reshape(-1, 3).tolist()]
    assert sum(p != (255, 255, 255) for p in pixels) > 1000  # the particles are drawn, not a blank sheet


def test_info_reports_versions_and_devices():
    result = invoke("info", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["diffmpm"] == __version__
    assert "cpu" in data["warp_devices"]
    assert isinstance(data["cuda_usable"], bool)


def test_bench_json_goes_to_stdout_and_the_table_to_stderr():
    """The one --json convention: stdout holds the JSON document alone (redirect it to a file), the table goes to
    stderr."""
    result = invoke("bench", "render", "--gaussians", "40", "--size", "16x16", "--repeats", "1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["forward_s"] > 0 and data["backward_s"] > 0
    assert "rasteriser" in result.stderr and "{" not in result.stderr
