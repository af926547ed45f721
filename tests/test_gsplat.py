"""Against gsplat 1.5.3 on the GPU machine (gsplat is optional: skipped where it is not installed)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu


def test_matches_gsplat_at_100k_gaussians_1024():
    pytest.importorskip("gsplat")
    from diffmpm_cli.bench import compare_with_gsplat

    result = compare_with_gsplat(gaussians=100_000, width=1024, height=1024)
    print(result)
    assert result["intersections"]["ours"] == result["intersections"]["gsplat"]
    assert result["image_max_abs"] <= 1e-3 and result["alpha_max_abs"] <= 1e-3
    for name, err in result["grad_rel_l2"].items():
        assert err <= 1e-3, f"d/d{name}: relative L2 {err:.2e}"
