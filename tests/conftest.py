"""Shared fixtures: a small valid scene as a dict, and a helper that writes scenes to disk."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SCENES = sorted((REPO / "scenes").glob("*.yaml"))

BASE_SCENE = {
    "name": "base",
    "source": {"shape": "sphere", "radius": 0.15, "center": [0.5, 0.5, 0.5]},
    "target": {
        "mesh": {
            "shape": "union",
            "center": [0.5, 0.5, 0.5],
            "parts": [
                {"shape": "sphere", "radius": 0.12, "center": [0.0, -0.08, 0.0]},
                {"shape": "box", "size": [0.1, 0.1, 0.1], "center": [0.0, 0.12, 0.0], "rotation": [0, 30, 0]},
            ],
        }
    },
    "material": {"E": 2.0e4, "nu": 0.3, "density": 1000.0},
    "sim": {"grid_resolution": 16, "dt": 1.0e-3, "steps": 20, "control_stride": 5, "frames": [10]},
    "learn": {"dFc": {"enabled": True, "lr": 0.01}, "color": {"enabled": True}},
    "render": {
        "width": 32,
        "height": 32,
        "cameras": [
            {"type": "orbit", "azimuths": [0, 120], "elevation": 20, "radius": 2.0, "fov": 30},
            {"type": "pinhole", "name": "front", "fov": 35, "eye": [0.5, 0.6, 2.0]},
        ],
    },
    "loss": {"grid_mass": 1.0, "silhouette": 1.0},
}


@pytest.fixture
def base_scene() -> dict:
    return copy.deepcopy(BASE_SCENE)


@pytest.fixture
def write_scene(tmp_path):
    """write_scene(data, name="scene.yaml") -> path of a YAML file holding ``data`` (a dict or raw text)."""

    def write(data, name: str = "scene.yaml") -> Path:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
        return path

    return write


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; without it they are skipped (and say so)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
