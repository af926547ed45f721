"""The finite-difference checker: it passes on the real stages and it can fail."""

from __future__ import annotations

import pytest
from conftest import REPO

from diffmpm_cli.assets import build_assets
from diffmpm_cli.config import load_scene
from diffmpm_cli.gradcheck import check_stages
from diffmpm_cli.pipeline import Pipeline
from diffmpm_cli.sim import solver


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


def test_a_wrong_adjoint_is_caught(pipe, monkeypatch):
    """Scale the dFc gradient of the MPM backward by 1.1: the checker must report that row as failed."""
    original = solver.Rollout.backward

    def wrong(self, grads):
        out = list(original(self, grads))
        out[4] = out[4] * 1.1
        return tuple(out)

    monkeypatch.setattr(solver.Rollout, "backward", wrong)
    rows = check_stages(pipe, stages=["sim"], groups=["dFc", "E"], probes=3, coordinates=0)
    verdict = {r.parameter: r.passed for r in rows}
    assert verdict == {"dFc": False, "log_E": True}
