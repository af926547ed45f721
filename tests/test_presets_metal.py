"""The metal preset (configs/materials.yaml `aluminium`: 6061-T6's typical values, see the comment there): it loads
with them, `validate` refuses the usual CPU time step with one line naming a stable one, and at a stable step a
block strained past yield comes back to the yield surface the cited strength implies (|dev log strain| =
sqrt(2/3) 276 MPa / 2 mu), while a block strained below yield keeps its strain."""

from __future__ import annotations

import math

import pytest
import torch

ALUMINIUM = {"model": "von_mises", "E": 6.89e10, "nu": 0.33, "yield_stress": math.sqrt(2.0 / 3.0) * 276e6,
             "density": 2700.0}


def _scene(write_scene, dt=2e-7, **material):
    from conftest import BASE_SCENE

    from diffmpm_cli.config import load_scene

    sim = {**BASE_SCENE["sim"], "steps": 2, "control_stride": 2, "frames": [], "dt": dt, "gravity": [0.0, 0.0, 0.0]}
    return load_scene(write_scene({**BASE_SCENE, "material": {"preset": "aluminium", **material}, "sim": sim}))


def test_aluminium_preset_loads_with_the_cited_values(write_scene):
    cfg = _scene(write_scene)
    for key, value in ALUMINIUM.items():
        expected = value if isinstance(value, str) else pytest.approx(value, rel=1e-3)
        assert getattr(cfg.material, key) == expected, key


def test_aluminium_at_a_cpu_time_step_is_refused_with_a_stable_one(write_scene, tmp_path):
    import subprocess
    import sys

    import yaml
    from conftest import BASE_SCENE

    scene = {**BASE_SCENE, "material": {"preset": "aluminium"}}
    path = tmp_path / "metal.yaml"
    path.write_text(yaml.safe_dump(scene))
    run = subprocess.run([sys.executable, "-m", "diffmpm_cli", "validate", str(path)], capture_output=True, text=True)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: sim.dt") and "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize("strain,yields", [(0.02, True), (0.002, False)])
def test_aluminium_yields_at_its_cited_strength(write_scene, strain, yields):
    from diffmpm_cli.assets import build_assets
    from diffmpm_cli.pipeline import Pipeline

    cfg = _scene(write_scene)
    pipeline = Pipeline(cfg, build_assets(cfg))
    n = pipeline.x0.shape[0]
    F = torch.diag(torch.tensor([math.exp(strain), math.exp(-strain), 1.0])).expand(n, 3, 3).contiguous()
    start = {"x": pipeline.x0, "v": torch.zeros_like(pipeline.x0), "F": F, "C": torch.zeros_like(F)}
    with torch.no_grad():
        out = pipeline.simulate({}, start=start)
    s = torch.linalg.svdvals(out.F[-1].double())
    eps = torch.log(s)
    dev = (eps - eps.mean(-1, keepdim=True)).norm(dim=-1)
    mu = 6.89e10 / (2 * (1 + 0.33))
    surface = math.sqrt(2.0 / 3.0) * 276e6 / (2 * mu)  # 4.35e-3
    start_dev = math.sqrt(2.0) * strain
    if yields:  # from 2.8e-2 back to the surface, within the step's own deformation
        assert float(dev.median()) == pytest.approx(surface, rel=0.01)  # 4.345e-3 measured
    else:  # 2.8e-3 < 4.35e-3: elastic, the strain stays
        assert float(dev.median()) == pytest.approx(start_dev, rel=0.01)  # 2.827e-3 measured
