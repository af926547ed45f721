"""summary.json of a scene with several materials (material.regions): each part's model and values ("materials"),
no mean over parts of different materials; single-material scenes keep their summary as it was."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO

from diffmpm_cli.assets import build_assets
from diffmpm_cli.config import load_scene
from diffmpm_cli.optimize.outputs import material_parts
from diffmpm_cli.optimize.run import optimize
from diffmpm_cli.pipeline import Pipeline
from diffmpm_cli.sweep.trials import metric_names

MIXED = REPO / "scenes" / "jelly_on_sand.yaml"  # a jelly cube (fixed_corotated, E 5e4) on a sand region (E 1e5)
SMALL = ["sim.steps=20", "sim.control_stride=20", "sim.frames=[10]", "render.width=32", "render.height=32",
         "appearance.surface_samples=400", "optimize.iterations=2", "output.turntable_frames=0"]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed")
    scene = load_scene(MIXED, SMALL)
    summary = optimize(scene=scene, assets=build_assets(scene), out_dir=out)
    return out, summary


def test_mixed_scene_summary_reports_each_part(mixed_run):
    out, summary = mixed_run
    assert json.loads((out / "summary.json").read_text())["materials"] == summary["materials"]
    cube, sand = summary["materials"]
    assert (cube["part"], cube["model"], sand["part"], sand["model"]) == \
        ("material", "fixed_corotated", "regions[0]", "drucker_prager")
    assert cube["particles"] > 0 and sand["particles"] > 0
    assert cube["density"] == 1000.0 and sand["density"] == 1600.0
    for stage in ("initial", "final"):  # the fixed values, each part's own (the mean over both was 89,936 Pa)
        assert cube[stage] == {"E": pytest.approx(5.0e4), "nu": pytest.approx(0.3)}, cube[stage]
        assert sand[stage]["E"] == pytest.approx(1.0e5) and sand[stage]["nu"] == pytest.approx(0.3)
        assert not any(key.endswith("_range") for key in sand[stage])  # a global value: one number
    # the learned friction angle belongs to the sand alone, starts at the scene's 11.7 deg and ends where it was learned
    assert cube["learned"] == [] and sand["learned"] == ["friction_angle"]
    assert sand["initial"]["friction_angle"] == pytest.approx(11.7, abs=1e-4)
    assert sand["final"]["friction_angle"] == pytest.approx(summary["learned"]["friction_angle"], abs=1e-4)
    assert sand["final"]["friction_angle"] != pytest.approx(11.7, abs=1e-3)  # it moved in two iterations
    # E and nu are set per region: no mean over particles of both materials in initial/final; the friction angle,
    # which has a truth, stays (the main metric is its error)
    for stage in ("initial", "final"):
        assert "E" not in summary[stage] and "nu" not in summary[stage], sorted(summary[stage])
    assert summary["final"]["friction_angle"] == pytest.approx(sand["final"]["friction_angle"], abs=1e-4)
    assert summary["main_metric"][0] == "friction_angle_abs_error"
    # nor in any line of metrics.jsonl, nor among the metrics a sweep may name
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines and all("friction_angle" in line and "E" not in line and "nu" not in line for line in lines)
    names = metric_names(load_scene(MIXED, SMALL))
    assert "E" not in names and "nu" not in names


def test_per_particle_values_are_reported_per_part():
    """A group learned per particle: each part reports its own particles' mean and range, not the whole body's."""
    scene = load_scene(MIXED, [*SMALL, "learn.friction_angle.per_particle=true", "learn.E.enabled=true",
                               "learn.E.per_particle=true"])
    pipeline = Pipeline(scene, build_assets(scene))
    start = pipeline.initial_parameters(["friction_angle", "log_E"])
    region = pipeline.assets.source.region
    sand = region == 0
    angle = torch.where(sand, 30.0, 11.7) + 0.5 * (torch.arange(len(region)) % 3 == 0).float()  # sand 30-30.5
    params = {"friction_angle": angle, "log_E": start["log_E"].clone()}
    params["log_E"][~sand] = torch.log(torch.tensor(6.0e4))  # the cube's E moved to 6e4 everywhere
    cube, sand_part = material_parts(pipeline, start, params)
    assert cube["learned"] == ["E"] and sand_part["learned"] == ["E", "friction_angle"]
    assert "friction_angle" not in cube["final"]  # not a parameter of the cube's model
    assert cube["initial"]["E"] == pytest.approx(5.0e4) and cube["final"]["E"] == pytest.approx(6.0e4)
    assert sand_part["final"]["E"] == pytest.approx(1.0e5) and "E_range" not in sand_part["final"]
    values = angle[sand]
    assert sand_part["final"]["friction_angle"] == pytest.approx(float(values.mean()), rel=1e-6)
    assert sand_part["final"]["friction_angle_range"] == pytest.approx([30.0, 30.5])
    assert sand_part["initial"]["friction_angle"] == pytest.approx(11.7, abs=1e-4)


def test_single_material_scene_keeps_its_summary():
    """No regions: no "materials" entry and no key taken out of the metrics."""
    scene = load_scene(REPO / "scenes" / "elastic_drop.yaml", ["sim.steps=4", "sim.control_stride=4", "sim.frames=[]"])
    pipeline = Pipeline(scene, build_assets(scene))
    params = pipeline.initial_parameters(["log_E", "nu"])
    assert material_parts(pipeline, params, params) is None
    assert "E" in metric_names(scene) and "nu" in metric_names(scene)
