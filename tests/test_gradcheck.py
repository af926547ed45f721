"""The finite-difference checker: it passes on the real stages and it can fail."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from diffmpm_cli.assets import build_assets
from diffmpm_cli.config import load_scene
from diffmpm_cli.gradcheck import check_stages
from diffmpm_cli.pipeline import Pipeline
from diffmpm_cli.sim import solver
from diffmpm_cli.sim.solver import FrozenDecisions


@pytest.fixture(scope="module")
def pipe():
    scene = load_scene(REPO / "scenes" / "sphere_to_snowman.yaml")
    return Pipeline(scene, build_assets(scene))


def test_sim_and_splat_stages_pass(pipe):
    rows = check_stages(pipe, stages=["sim", "splats"], groups=["dFc", "E", "nu", "v0", "sigma0"], probes=3,
                        coordinates=1)
    assert {(r.stage, r.parameter) for r in rows} == {
        ("sim", "dFc"), ("sim", "log_E"), ("sim", "nu"), ("sim", "v0"),
        ("splats", "log_sigma0"), ("splats", "x"), ("splats", "F")}
    for row in rows:
        assert row.passed and row.probes == 4, row


def break_the_dfc_adjoint(monkeypatch):
    """Scale the dFc gradient of the MPM backward by 1.1 (a wrong adjoint the checker must catch)."""
    original = solver.Rollout.backward

    def wrong(self, grads):
        out = list(original(self, grads))
        out[4] = out[4] * 1.1
        return tuple(out)

    monkeypatch.setattr(solver.Rollout, "backward", wrong)


def test_a_wrong_adjoint_is_caught(pipe, monkeypatch):
    break_the_dfc_adjoint(monkeypatch)
    rows = check_stages(pipe, stages=["sim"], groups=["dFc", "E"], probes=3, coordinates=0)
    verdict = {r.parameter: r.passed for r in rows}
    assert verdict == {"dFc": False, "log_E": True}


def test_render_and_whole_pipeline_stages_pass(pipe):
    """Through the float32 rasteriser and the whole pipeline (scene loss), with the cut-offs made continuous."""
    rows = check_stages(pipe, stages=["render", "all"], groups=["dFc", "E", "v0", "opacity", "sigma0"], probes=3,
                        coordinates=1)
    assert {(r.stage, r.parameter) for r in rows} == {
        ("render", "opacity_logit"), ("render", "means"), ("render", "covars"),
        ("all", "dFc"), ("all", "log_E"), ("all", "v0"), ("all", "opacity_logit"), ("all", "log_sigma0")}
    for row in rows:
        assert row.passed and row.noise < 0.15, row
        # one particle's volume-preserving log strain moves the scene loss by ~1e-7: that coordinate probe sits at
        # the float32 noise (measured 7 % against a 7 % noise allowance); every other row is within 5 %
        assert row.worst_rel_error < (0.1 if (row.stage, row.parameter) == ("all", "dFc") else 0.05), row


def test_the_cli_reports_a_wrong_adjoint_with_exit_1(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from diffmpm_cli.cli import app

    scene = REPO / "scenes" / "sphere_to_snowman.yaml"
    args = ["check-grad", str(scene), "--stage", "sim", "--param", "dFc,E", "--probes", "3", "--coordinates", "0",
            "--json"]
    ok = CliRunner().invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert "all 2 rows passed" in ok.stderr  # with --json the table goes to stderr, the JSON alone to stdout
    assert json.loads(ok.stdout)["passed"] is True
    break_the_dfc_adjoint(monkeypatch)
    bad = CliRunner().invoke(app, args)
    assert bad.exit_code == 1, bad.output
    assert "FAIL" in bad.stderr and "1 of 2 rows failed" in bad.stderr
    report = json.loads(bad.stdout)
    assert report["passed"] is False
    assert {r["parameter"]: r["passed"] for r in report["rows"]} == {"dFc": False, "log_E": True}


def test_the_cli_refuses_bad_options_with_exit_2():
    from typer.testing import CliRunner

    from diffmpm_cli.cli import app

    scene = str(REPO / "scenes" / "sphere_to_snowman.yaml")
    for extra in (["--stage", "physics"], ["--param", "dFc,mass"], ["--device", "tpu"], ["--set", "sim.dt=-1"]):
        result = CliRunner().invoke(app, ["check-grad", scene, *extra])
        assert result.exit_code == 2, (extra, result.stdout)
        assert "Traceback" not in result.stdout


def test_contact_decisions_record_and_replay():
    """Replaying the recorded grid-update decisions at the recording point gives the same rollout bit for bit;
    and the sim stage of a ball hitting a frictional floor passes only because its kinks are frozen."""
    import torch

    scene = load_scene(REPO / "scenes" / "elastic_drop.yaml")
    drop = Pipeline(scene, build_assets(scene))
    frozen = FrozenDecisions()
    with torch.no_grad():
        deciding = drop.simulate({})
        recorded = drop.simulate({}, frozen=frozen)
        replayed = drop.simulate({}, frozen=frozen)
    assert sorted(frozen.steps) == list(range(drop.steps))
    for a, b, c in zip((deciding.x, deciding.F), (recorded.x, recorded.F), (replayed.x, replayed.F), strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)
    assert float(deciding.x[-1][:, 1].min()) < scene.sim.floor.height + 0.02  # it did reach the floor
    rows = check_stages(drop, stages=["sim"], groups=["dFc", "v0"], probes=2, coordinates=2)
    assert all(r.passed for r in rows), rows
