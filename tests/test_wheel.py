"""The built wheel, installed with pip into a fresh virtual environment, not the editable checkout: it holds every
package and the example scenes, and `diffmpm optimize sphere_to_snowman` runs from another folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

from conftest import REPO

SMALL = ["sim.steps=20", "sim.frames=[10]", "render.width=32", "render.height=32", "appearance.surface_samples=600",
         "output.turntable_frames=0", "evaluate.size=32"]
# what is not the source (build/ would leak stale modules into the wheel: setuptools never cleans it)
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info", ".gpu", "__pycache__",
                                ".pytest_cache", ".ruff_cache", ".hypothesis", "docs")


def run(args, **kwargs):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)


def test_the_wheel_installs_and_runs_a_shipped_scene_from_another_folder(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=IGNORE)
    build = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
                 source])
    assert build.returncode == 0, build.stderr[-2000:]
    assert "Warning" not in build.stderr and "deprecat" not in build.stderr.lower(), build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("diffmpm-*.whl"))
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "diffmpm_cli").rglob("__init__.py")}
    for package in packages:
        assert f"{package}/__init__.py" in names, f"{package} is missing from the wheel"
    for kernel in (REPO / "kernels").glob("*.py"):
        assert f"diffmpm_cli/kernels/{kernel.name}" in names
    assert "diffmpm_cli/configs/materials.yaml" in names and not any(n.startswith("kernels/") for n in names)
    for scene in (REPO / "scenes").glob("*.yaml"):
        assert f"diffmpm_cli/scenes/{scene.name}" in names, scene.name
    for asset in [*(REPO / "scenes" / "meshes").glob("*.obj"), *(REPO / "scenes" / "images").glob("*.png"),
                  REPO / "scenes" / "meshes" / "README.md"]:
        assert f"diffmpm_cli/scenes/{asset.parent.name}/{asset.name}" in names, asset.name
    info = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = archive.read(info).decode()
    assert "License-Expression: MIT" in metadata and "Provides-Extra: video" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    # a fresh environment: pip installs the wheel (and its console script) into it; the heavy dependencies (torch,
    # Warp, ...) come from this environment's site-packages through a .pth line added only after the install, so pip
    # never sees (or touches) the editable install here, and this environment's .pth hooks are never run there
    env = tmp_path / "env"
    made = run([sys.executable, "-m", "venv", "--without-pip", env])
    assert made.returncode == 0, made.stderr
    python = env / "bin" / "python"
    install = run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    assert install.returncode == 0, install.stderr[-2000:]
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (tmp_path / "env" / site.split(str(env) + "/", 1)[1] / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    environ = {**os.environ, "PYTHONPATH": ""}
    where = run([python, "-c", "import diffmpm_cli; print(diffmpm_cli.__file__)"], cwd=elsewhere, env=environ)
    assert where.stdout.strip().startswith(site), where.stdout + where.stderr
    diffmpm = env / "bin" / "diffmpm"

    listed = run([diffmpm, "scenes"], cwd=elsewhere, env=environ)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "sphere_to_snowman" in listed.stdout and "torus_appearance" in listed.stdout

    copied = run([diffmpm, "scenes", "copy", "peanut_to_sphere", "mine"], cwd=elsewhere, env=environ)
    assert copied.returncode == 0, copied.stderr[-2000:]
    assert (elsewhere / "mine" / "meshes" / "peanut.obj").is_file()
    assert (elsewhere / "mine" / "meshes" / "README.md").is_file()  # the licence notes travel with the meshes
    checked = run([diffmpm, "validate", "mine/peanut_to_sphere.yaml"], cwd=elsewhere, env=environ)
    assert checked.returncode == 0, checked.stdout[-1000:] + checked.stderr[-2000:]
    again = run([diffmpm, "scenes", "copy", "peanut_to_sphere", "mine"], cwd=elsewhere, env=environ)
    assert again.returncode == 2 and "already exists" in again.stderr

    args = [diffmpm, "optimize", "sphere_to_snowman", "--iters", "1", "--out", "run", "--quiet"]
    optimized = run(args + sum((["--set", s] for s in SMALL), []), cwd=elsewhere, env=environ)
    assert optimized.returncode == 0, optimized.stdout[-2000:] + optimized.stderr[-3000:]
    summary = json.loads((elsewhere / "run" / "summary.json").read_text())
    assert summary["iterations"] == 1 and (elsewhere / "run" / "final" / "gaussians.ply").exists()
