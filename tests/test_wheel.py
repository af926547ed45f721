"""The built wheel, not the editable checkout: it holds every package and a run from it optimises a scene."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import yaml
from conftest import BASE_SCENE, REPO

# run the console entry point with the editable install's import hooks removed, so only the wheel is importable
RUNNER = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
sys.path.insert(0, sys.argv.pop(1))
import diffmpm_cli
assert diffmpm_cli.__file__.startswith(sys.path[0]), diffmpm_cli.__file__
from diffmpm_cli.cli import app
sys.argv[0] = "diffmpm"
app()
"""


def test_the_wheel_holds_every_package_and_optimises(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("diffmpm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "diffmpm_cli").rglob("__init__.py")}
    for package in packages:
        assert f"{package}/__init__.py" in names, f"{package} is missing from the wheel"
    for kernel in (REPO / "kernels").glob("*.py"):
        assert f"diffmpm_cli/kernels/{kernel.name}" in names
    assert "diffmpm_cli/configs/materials.yaml" in names and "kernels/__init__.py" not in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    scene = {**BASE_SCENE, "optimize": {"iterations": 1}, "output": {"turntable_frames": 0},
             "evaluate": {"size": 32}}
    (tmp_path / "scene.yaml").write_text(yaml.safe_dump(scene))
    run = subprocess.run([sys.executable, "-c", RUNNER, str(site), "optimize", str(tmp_path / "scene.yaml"),
                          "--out", str(tmp_path / "run"), "--quiet"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["iterations"] == 1 and (tmp_path / "run" / "final" / "gaussians.ply").exists()
