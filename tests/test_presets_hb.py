"""The Herschel-Bulkley preset (configs/materials.yaml `yogurt`: Ramchandran & Shah 2009's fit, see the comment
there): it loads with the fit's values, its flow index reaches the rollout (the Herschel-Bulkley map, not Bingham's
closed form) and a few steps of a falling block stay finite."""

from __future__ import annotations

import pytest
import torch

# Ramchandran & Shah (2009), Dairy Sci. Technol. 89:583, Table VI, control yogurt (NEPSY), day 1
YOGURT = {"model": "bingham", "yield_stress": 8.0, "viscosity": 2.06, "flow_index": 0.62, "density": 1050.0,
          "E": 1.0e5, "nu": 0.3}


def _scene(write_scene, **material):
    from conftest import BASE_SCENE

    from diffmpm_cli.config import load_scene

    sim = {**BASE_SCENE["sim"], "steps": 4, "control_stride": 4, "frames": [], "dt": 1e-4,
           "gravity": [0.0, -9.81, 0.0]}
    return load_scene(write_scene({**BASE_SCENE, "material": {"preset": "yogurt", **material}, "sim": sim}))


def test_yogurt_preset_loads_with_the_fit(write_scene):
    cfg = _scene(write_scene)
    for key, value in YOGURT.items():
        assert getattr(cfg.material, key) == pytest.approx(value), key
    # a key given beside the preset still overrides it
    assert _scene(write_scene, flow_index=0.5).material.flow_index == 0.5


def test_yogurt_preset_runs_herschel_bulkley(write_scene):
    """A squeezed block of the preset yields at once (8 Pa is far below the stress of a 20 % strain at E = 1e5 Pa):
    a few steps stay finite, and they differ from the same block with N = 1 (Bingham's closed form with eta = K), so
    the flow index reaches the rollout beside the two learnable groups."""
    from diffmpm_cli.assets import build_assets
    from diffmpm_cli.pipeline import Pipeline

    def squeezed(cfg):
        pipeline = Pipeline(cfg, build_assets(cfg))
        F = torch.diag(torch.tensor([1.2, 0.8, 1.0])).expand(pipeline.x0.shape[0], 3, 3).contiguous()
        start = {"x": pipeline.x0, "v": torch.zeros_like(pipeline.x0), "F": F, "C": torch.zeros_like(F)}
        with torch.no_grad():
            return pipeline, pipeline.simulate({}, start=start)

    pipeline, hb = squeezed(_scene(write_scene))
    assert pipeline.material_parameters == ("yield_stress", "viscosity")
    assert torch.isfinite(hb.x).all() and torch.isfinite(hb.F).all()
    _, linear = squeezed(_scene(write_scene, flow_index=1.0))
    assert float((hb.F[-1] - linear.F[-1]).abs().max()) > 1e-4  # 4.3e-4 measured
