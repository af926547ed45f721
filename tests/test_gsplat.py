"""Against gsplat 1.5.3 on the GPU machine (gsplat is optional: skipped where it is not installed)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
def test_matches_gsplat_at_100k_gaussians_1024(rasterize_mode):
    """Identical intersection lists, gradients within 1e-3 relative L2, images within 1e-3.

    Measured exception: a pixel or two per million sits within float rounding of a compositing cut-off (alpha =
    1/255 skip, T = 1e-4 stop) and is decided differently by gsplat's float32 footprint and our float64 one (which
    the float64 twin needs for needle-thin Gaussians); such a pixel differs by up to alpha T <= ~2e-3. The test
    allows at most 2 of them per million and no pixel above 2e-3.
    """
    pytest.importorskip("gsplat")
    from diffmpm_cli.bench import compare_with_gsplat

    result = compare_with_gsplat(gaussians=100_000, width=1024, height=1024, rasterize_mode=rasterize_mode)
    print(result)
    assert result["intersections"]["ours"] == result["intersections"]["gsplat"]
    for name, err in result["grad_rel_l2"].items():
        assert err <= 1e-3, f"d/d{name}: relative L2 {err:.2e}"
    # antialiased: the opacity compensation (float64 here, float32 in gsplat) moves one more pixel across a cut-off
    # (measured on an H200: 3 pixels of 1,048,576 over 1e-3, 11 over 1e-4; classic 2 and fewer)
    allowed = 4 if rasterize_mode == "antialiased" else 2
    assert result["pixels_over_1e-3"] <= allowed * result["pixels"] / 1e6
    assert result["pixels_over_1e-4"] <= 20 * result["pixels"] / 1e6
    assert result["image_max_abs"] <= 2e-3 and result["alpha_max_abs"] <= 2e-3
