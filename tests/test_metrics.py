"""Evaluation metrics on small cases whose answers are known by hand."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from diffmpm_cli.metrics import (
    bbox_diagonal,
    chamfer_distance,
    clumping,
    deformation_validity,
    material_errors,
    nearest_distances,
    psnr,
    silhouette_iou,
    volumetric_iou,
)

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                  reason="needs CUDA")])]


def _lattice(lo: int, hi: int, spacing: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """Points (i, j, k) * spacing + offset for integer i, j, k in [lo, hi)."""
    r = torch.arange(lo, hi, dtype=torch.float32)
    g = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)
    return g * spacing + offset


# ---------------------------------------------------------------- silhouette IoU


def _square(size: int, top: int, left: int, side: int) -> torch.Tensor:
    img = torch.zeros(size, size)
    img[top:top + side, left:left + side] = 1.0
    return img


@pytest.mark.parametrize("device", DEVICES)
def test_silhouette_iou_overlapping_squares(device):
    a = torch.stack([_square(10, 0, 0, 4), _square(10, 1, 1, 4), _square(10, 0, 0, 4)])[..., None].to(device)
    b = torch.stack([_square(10, 2, 2, 4), _square(10, 1, 1, 4), _square(10, 6, 6, 4)])[..., None].to(device)
    iou = silhouette_iou(a, b)
    assert isinstance(iou, list) and all(isinstance(v, float) for v in iou)
    # 4x4 squares offset by (2, 2): intersection 2x2 = 4, union 16 + 16 - 4 = 28
    assert iou == pytest.approx([4 / 28, 1.0, 0.0])


def test_silhouette_iou_accepts_chw_and_empty_views():
    a = torch.zeros(3, 5, 5)
    b = torch.zeros(3, 5, 5)
    a[1, 0, 0] = 1.0  # view 1: prediction has one pixel, target empty
    b[2, 0, 0] = 1.0  # view 2: target has one pixel, prediction empty
    assert silhouette_iou(a, b) == [1.0, 0.0, 0.0]


def test_silhouette_iou_threshold_is_strict():
    a = torch.full((1, 2, 2, 1), 0.5)
    b = torch.full((1, 2, 2, 1), 0.9)
    assert silhouette_iou(a, b) == [0.0]  # 0.5 is not > 0.5
    assert silhouette_iou(a, b, threshold=0.4) == [1.0]
    # soft values: 0.7 and 0.6 are in, 0.2 is out
    c = torch.tensor([0.7, 0.6, 0.2, 0.0]).reshape(1, 2, 2, 1)
    d = torch.tensor([0.9, 0.1, 0.8, 0.0]).reshape(1, 2, 2, 1)
    assert silhouette_iou(c, d) == pytest.approx([1 / 3])


def test_silhouette_iou_accepts_boolean_and_01_target_masks():
    alphas = torch.zeros(2, 6, 6, 1)
    alphas[0, :3, :, 0] = 0.8  # top half of view 0 (18 px)
    alphas[1, :, :2, 0] = 0.6  # left third of view 1 (12 px)
    mask = torch.zeros(2, 6, 6, dtype=torch.bool)  # [C,H,W] bool, as mesh_silhouettes returns
    mask[0, :, :3] = True  # left half: intersection 9, union 18 + 18 - 9 = 27
    mask[1, :, :2] = True  # identical
    assert silhouette_iou(alphas, mask) == pytest.approx([9 / 27, 1.0])
    assert silhouette_iou(alphas, mask.float()) == pytest.approx([9 / 27, 1.0])
    assert silhouette_iou(mask, mask[..., None]) == [1.0, 1.0]
    assert silhouette_iou(~mask, mask) == [0.0, 0.0]


def test_silhouette_iou_shape_mismatch():
    with pytest.raises(ValueError):
        silhouette_iou(torch.zeros(1, 4, 4, 1), torch.zeros(1, 4, 5, 1))
    with pytest.raises(ValueError):
        silhouette_iou(torch.zeros(4, 4), torch.zeros(4, 4))


# ---------------------------------------------------------------- Chamfer


@pytest.mark.parametrize("device", DEVICES)
def test_chamfer_offset_lattice_equals_offset(device):
    p = _lattice(0, 5).to(device)  # unit spacing
    q = p + torch.tensor([0.1, 0.0, 0.0], device=device)  # every nearest neighbour is the shifted copy
    assert chamfer_distance(p, q) == pytest.approx(0.1, abs=1e-6)
    assert chamfer_distance(q, p) == pytest.approx(0.1, abs=1e-6)
    shift = torch.tensor([0.03, -0.04, 0.0], device=device)  # |shift| = 0.05
    assert chamfer_distance(p, p + shift) == pytest.approx(0.05, abs=1e-6)


def test_chamfer_asymmetric_sets_by_hand():
    p = torch.tensor([[0.0, 0.0, 0.0]])
    q = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
    # P -> Q: 0; Q -> P: (0 + 5) / 2; symmetric mean: 1.25 (Euclidean, not squared: squared would give 6.25)
    assert chamfer_distance(p, q) == pytest.approx(1.25)
    assert chamfer_distance(q, p) == pytest.approx(1.25)
    assert bbox_diagonal(q) == pytest.approx(5.0)
    assert chamfer_distance(p, q, normalize_by=bbox_diagonal(q)) == pytest.approx(0.25)


def test_chamfer_identity_and_translation_invariance():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(400, 3, generator=g)
    q = torch.rand(300, 3, generator=g)
    assert chamfer_distance(p, p) == 0.0
    t = torch.tensor([10.0, -3.0, 2.5])
    assert chamfer_distance(p + t, q + t) == pytest.approx(chamfer_distance(p, q), rel=1e-5)


def test_chamfer_matches_full_cdist():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(5000, 3, generator=g)
    q = torch.randn(3000, 3, generator=g) * 0.7 + 0.2
    d = torch.cdist(p.double(), q.double())
    expected = 0.5 * (d.min(dim=1).values.mean().item() + d.min(dim=0).values.mean().item())
    assert chamfer_distance(p, q) == pytest.approx(expected, rel=1e-12)
    # duplicated points and a single point on either side
    assert chamfer_distance(torch.cat([p, p]), q) == pytest.approx(expected, rel=1e-12)
    one = q[:1]
    expected_one = 0.5 * (torch.cdist(p.double(), one.double()).mean().item()
                          + torch.cdist(one.double(), p.double()).min().item())
    assert chamfer_distance(p, one) == pytest.approx(expected_one, rel=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_brute_force_nearest_distances_match_the_kd_tree_where_the_tree_is_slow(device):
    """The GPU path (brute force) gives the k-d tree's distances, here for a small cloud deep inside a sphere (the
    geometry where k-d tree queries degrade)."""
    from scipy.spatial import cKDTree

    g = torch.Generator().manual_seed(2)
    surface = torch.randn(3000, 3, generator=g)
    surface = surface / surface.norm(dim=1, keepdim=True)
    inside = 0.3 * torch.randn(700, 3, generator=g)
    tree = torch.from_numpy(cKDTree(surface.double().numpy()).query(inside.double().numpy(), k=1)[0])
    got = nearest_distances(inside.to(device), surface.to(device)).cpu()
    assert torch.allclose(got, tree, rtol=0, atol=1e-12)
    back = torch.from_numpy(cKDTree(inside.double().numpy()).query(surface.double().numpy(), k=1)[0])
    assert torch.allclose(nearest_distances(surface.to(device), inside.to(device)).cpu(), back, rtol=0, atol=1e-12)
    assert chamfer_distance(inside.to(device), surface.to(device)) == pytest.approx(
        0.5 * (float(tree.mean()) + float(back.mean())), rel=1e-12)


def test_chamfer_accepts_grad_tensors_and_rejects_empty():
    p = torch.zeros(4, 3, requires_grad=True)
    q = torch.ones(2, 3)
    assert chamfer_distance(p, q) == pytest.approx(math.sqrt(3.0), rel=1e-6)
    with pytest.raises(ValueError):
        chamfer_distance(torch.zeros(0, 3), q)
    with pytest.raises(ValueError):
        chamfer_distance(torch.zeros(4, 2), q)


def test_bbox_diagonal():
    assert bbox_diagonal(_lattice(0, 2)) == pytest.approx(math.sqrt(3.0))
    box = torch.tensor([[0.0, 0.0, 0.0], [2.0, 3.0, 6.0], [1.0, 1.0, 1.0]])
    assert bbox_diagonal(box) == pytest.approx(7.0)
    assert bbox_diagonal(torch.tensor([[1.0, 2.0, 3.0]])) == 0.0


# ---------------------------------------------------------------- volumetric IoU


@pytest.mark.parametrize("device", DEVICES)
def test_volumetric_iou_overlapping_boxes(device):
    dx = 0.1
    # one particle at the centre of each cell: box A covers cells [0, 4)^3, box B cells [2, 6)^3
    a = _lattice(0, 4, spacing=dx, offset=0.5 * dx).to(device)
    b = _lattice(2, 6, spacing=dx, offset=0.5 * dx).to(device)
    # intersection 2^3 = 8 cells, union 64 + 64 - 8 = 120
    iou = volumetric_iou(a, b, lower=[0.0, 0.0, 0.0], dx=dx, shape=(8, 8, 8))
    assert iou == pytest.approx(8 / 120)
    assert volumetric_iou(a, a, lower=(0.0, 0.0, 0.0), dx=dx, shape=(8, 8, 8)) == 1.0


def test_volumetric_iou_counts_cells_not_particles():
    dx = 0.1
    a = _lattice(0, 4, spacing=dx, offset=0.5 * dx)  # 1 particle per cell, cells [0, 4)^3
    b = _lattice(4, 12, spacing=0.5 * dx, offset=0.25 * dx)  # 8 particles per cell, cells [2, 6)^3
    assert volumetric_iou(a, b, lower=torch.zeros(3), dx=dx, shape=[8, 8, 8]) == pytest.approx(8 / 120)


def test_volumetric_iou_lower_corner_and_anisotropic_cells():
    lower = [-1.0, 2.0, 0.5]
    dx = [0.1, 0.2, 0.4]

    def centres(*ijk: int) -> list[float]:
        return [lo + (i + 0.5) * h for lo, i, h in zip(lower, ijk, dx)]

    a = torch.tensor([centres(0, 0, 0), centres(1, 0, 0), centres(1, 1, 1)])
    b = torch.tensor([centres(1, 0, 0), centres(1, 1, 1), centres(2, 2, 2), centres(2, 2, 2)])
    # cells A = {000, 100, 111}, B = {100, 111, 222}: intersection 2, union 4
    assert volumetric_iou(a, b, lower=lower, dx=dx, shape=(4, 4, 4)) == pytest.approx(0.5)


def test_volumetric_iou_clamps_outside_points_and_empty_sets():
    # points beyond the grid land in its border cells
    a = torch.tensor([[-5.0, -5.0, -5.0], [5.0, 5.0, 5.0]])
    b = torch.tensor([[0.05, 0.05, 0.05], [0.35, 0.35, 0.35]])
    assert volumetric_iou(a, b, lower=[0, 0, 0], dx=0.1, shape=(4, 4, 4)) == 1.0
    empty = torch.zeros(0, 3)
    assert volumetric_iou(empty, empty, lower=[0, 0, 0], dx=0.1, shape=(4, 4, 4)) == 1.0
    assert volumetric_iou(empty, b, lower=[0, 0, 0], dx=0.1, shape=(4, 4, 4)) == 0.0
    with pytest.raises(ValueError):
        volumetric_iou(b, b, lower=[0, 0, 0], dx=0.0, shape=(4, 4, 4))


# ---------------------------------------------------------------- PSNR


@pytest.mark.parametrize("device", DEVICES)
def test_psnr_known_mse(device):
    target = torch.zeros(3, 4, 5, 3, device=device)
    images = target.clone()
    images[0] += 0.1  # MSE 0.01 -> 20 dB
    images[1] += 0.01  # MSE 1e-4 -> 40 dB
    # view 2 identical -> inf
    out = psnr(images, target)
    assert out[0] == pytest.approx(20.0, abs=1e-4)
    assert out[1] == pytest.approx(40.0, abs=1e-3)
    assert out[2] == math.inf


def test_psnr_half_pixels_wrong():
    target = torch.zeros(1, 2, 2, 3)
    images = target.clone()
    images[0, 0] = 0.2  # half the pixels off by 0.2: MSE = 0.5 * 0.04 = 0.02
    assert psnr(images, target)[0] == pytest.approx(-10 * math.log10(0.02), abs=1e-4)


def test_psnr_masked():
    target = torch.full((2, 4, 4, 3), 0.5)
    images = target.clone()
    mask = torch.zeros(2, 4, 4, 1)
    mask[:, :2] = 1.0
    images[:, :2] += 0.1  # inside the mask: error 0.1 -> 20 dB
    images[:, 2:] -= 0.5  # outside the mask: ignored
    assert psnr(images, target, mask=mask) == pytest.approx([20.0, 20.0], abs=1e-4)
    assert psnr(images, target, mask=mask[..., 0]) == pytest.approx([20.0, 20.0], abs=1e-4)
    unmasked = (0.5 * 0.01 + 0.5 * 0.25)
    assert psnr(images, target) == pytest.approx([-10 * math.log10(unmasked)] * 2, abs=1e-4)


def test_psnr_empty_mask_is_nan_and_shape_checks():
    target = torch.zeros(2, 3, 3, 3)
    images = target + 0.1
    mask = torch.zeros(2, 3, 3, 1)
    mask[0] = 1.0
    out = psnr(images, target, mask=mask)
    assert out[0] == pytest.approx(20.0, abs=1e-4)
    assert math.isnan(out[1])
    with pytest.raises(ValueError):
        psnr(images, target[:, :2])


# ---------------------------------------------------------------- material


def test_material_errors():
    errs = material_errors(E=1.5e4, nu=0.25, truth_E=2.0e4, truth_nu=0.3)
    assert errs == pytest.approx({"E_rel_error": 0.25, "nu_abs_error": 0.05})
    assert material_errors(E=torch.tensor(3.0e4), truth_E=2.0e4) == pytest.approx({"E_rel_error": 0.5})
    assert material_errors(nu=torch.tensor([0.4]), truth_nu=0.3) == pytest.approx({"nu_abs_error": 0.1})
    assert material_errors(E=1.0, nu=0.3) == {}
    assert material_errors(truth_E=1.0, nu=0.3, truth_nu=0.3) == {"nu_abs_error": 0.0}
    assert material_errors() == {}
    with pytest.raises(ValueError):
        material_errors(E=1.0, truth_E=0.0)


# ---------------------------------------------------------------- physical validity


def _rotations(count: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(count, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    return q * torch.sign(torch.linalg.det(q))[:, None, None]  # det +1


@pytest.mark.parametrize("device", DEVICES)
def test_deformation_validity_one_inverted_particle(device):
    n = 50
    scale = torch.linspace(0.5, 2.0, n, dtype=torch.float64)  # J = s^3 of a uniform stretch s
    F = _rotations(n, 0) * scale[:, None, None]
    F[17] = torch.diag(torch.tensor([1.0, 1.0, -0.3], dtype=torch.float64))  # a reflection: J = -0.3
    out = deformation_validity(F.to(device=device, dtype=torch.float32))
    assert set(out) == {"inverted_share", "nonfinite_share", "det_F_min", "det_F_median", "det_F_max"}
    assert all(isinstance(v, float) for v in out.values())
    assert out["inverted_share"] == pytest.approx(1 / n)
    assert out["nonfinite_share"] == 0.0
    assert out["det_F_min"] == pytest.approx(-0.3, rel=1e-5)
    J = torch.cat([scale[:17] ** 3, torch.tensor([-0.3], dtype=torch.float64), scale[18:] ** 3]).sort().values
    assert out["det_F_median"] == pytest.approx(0.5 * (J[24] + J[25]).item(), rel=1e-5)
    assert out["det_F_max"] == pytest.approx(8.0, rel=1e-5)


def test_deformation_validity_counts_degenerate_and_skips_nonfinite():
    F = torch.eye(3).repeat(5, 1, 1)
    F[0, 2, 2] = 0.0  # flattened to zero volume: J = 0 counts as inverted
    F[1] = torch.nan
    F[2] *= 2.0  # J = 8
    F[3] *= 0.5  # J = 0.125
    out = deformation_validity(F)
    assert out["inverted_share"] == pytest.approx(1 / 5)
    assert out["nonfinite_share"] == pytest.approx(1 / 5)
    # finite J: 0, 8, 0.125, 1 -> median (0.125 + 1) / 2
    assert (out["det_F_min"], out["det_F_median"], out["det_F_max"]) == pytest.approx((0.0, 0.5625, 8.0))
    assert deformation_validity(torch.eye(3).reshape(1, 3, 3).expand(3, 3, 3))["det_F_median"] == 1.0
    with pytest.raises(ValueError):
        deformation_validity(torch.zeros(4, 2, 2))
    with pytest.raises(ValueError):
        deformation_validity(torch.zeros(0, 3, 3))


def test_deformation_validity_determinant_in_float64():
    # a nearly singular float32 F (third row close to 0.37 row 0 + 1.3 row 1): its determinant in float32 comes out
    # about -2.6e-7, with the wrong sign; the exact determinant of these float32 values is about +1.67e-7
    rows = [[0.7538710236549377, -1.1718801259994507, 0.2681654393672943],
            [0.9764833450317383, 0.6328479051589966, -2.1646602153778076],
            [1.5483605861663818, 0.3891065716743469, -2.714836835861206]]
    (a, b, c), (d, e, f), (g, h, i) = [[Fraction(v) for v in row] for row in rows]
    exact = float(a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g))
    assert exact > 0
    F = torch.tensor(rows, dtype=torch.float32)[None].repeat(4, 1, 1)
    F[1:] = torch.eye(3)
    out = deformation_validity(F)
    assert out["inverted_share"] == 0.0
    assert out["det_F_min"] == pytest.approx(exact, rel=1e-6)


def _cell_lattice(cells: int, per_axis: int, dx: float) -> torch.Tensor:
    """per_axis^3 particles per cell of a cells^3 grid with lower corner 0, spread evenly inside each cell."""
    return _lattice(0, cells * per_axis, spacing=dx / per_axis, offset=0.5 * dx / per_axis).double()


@pytest.mark.parametrize("device", DEVICES)
def test_clumping_uniform_lattice_is_clean(device):
    dx = 0.1
    x = _cell_lattice(6, 2, dx).to(device)  # 8 per cell
    out = clumping(x, lower=[0.0, 0.0, 0.0], dx=dx, shape=(6, 6, 6), rest_count=8)
    assert out == {"clumped_share": 0.0, "max_per_cell": 8, "max_per_cell_ratio": 1.0}
    assert isinstance(out["max_per_cell"], int)


@pytest.mark.parametrize("device", DEVICES)
def test_clumping_counts_a_clump_exactly(device):
    dx = 0.1
    x = _cell_lattice(6, 2, dx)  # 6^3 cells x 8 = 1728 particles
    n = x.shape[0] + 100
    clump = torch.full((100, 3), 2.5 * dx, dtype=torch.float64) + 0.01 * dx * torch.rand(100, 3)  # cell (2, 2, 2)
    x = torch.cat([x, clump]).to(device)
    out = clumping(x, lower=torch.zeros(3), dx=dx, shape=[6, 6, 6], rest_count=8)
    # the clump's cell holds its 8 lattice particles + 100 > 32: all 108 are clumped; every other cell holds 8
    assert out["clumped_share"] == pytest.approx(108 / n)
    assert out["max_per_cell"] == 108
    assert out["max_per_cell_ratio"] == pytest.approx(108 / 8)
    # 108 > 4 x 26 but not > 5 x 26: the threshold is strict and scales with rest_count and factor
    assert clumping(x, lower=[0, 0, 0], dx=dx, shape=(6, 6, 6), rest_count=26)["clumped_share"] == pytest.approx(108 / n)
    assert clumping(x, lower=[0, 0, 0], dx=dx, shape=(6, 6, 6), rest_count=27)["clumped_share"] == 0.0
    assert clumping(x, lower=[0, 0, 0], dx=dx, shape=(6, 6, 6), rest_count=26, factor=5.0)["clumped_share"] == 0.0


def test_clumping_bins_like_volumetric_iou():
    lower, dx = [-1.0, 2.0, 0.5], [0.1, 0.2, 0.4]
    # 5 points beyond the grid land in its border cell (0, 0, 0) or (3, 3, 3), like volumetric_iou
    low = torch.tensor([[-9.0, -9.0, -9.0]]).repeat(5, 1)
    high = torch.tensor([[9.0, 9.0, 9.0]]).repeat(2, 1)
    inside = torch.tensor([[-0.95, 2.1, 0.7]])  # also cell (0, 0, 0)
    x = torch.cat([low, high, inside])
    out = clumping(x, lower=lower, dx=dx, shape=(4, 4, 4), rest_count=1.0)
    # cell (0,0,0) holds 6 > 4: 6 of 8 particles; cell (3,3,3) holds 2
    assert out == {"clumped_share": 6 / 8, "max_per_cell": 6, "max_per_cell_ratio": 6.0}
    with pytest.raises(ValueError):
        clumping(x, lower=lower, dx=0.0, shape=(4, 4, 4), rest_count=1)
    with pytest.raises(ValueError):
        clumping(x, lower=lower, dx=dx, shape=(4, 4, 4), rest_count=0)
    with pytest.raises(ValueError):
        clumping(torch.zeros(0, 3), lower=lower, dx=dx, shape=(4, 4, 4), rest_count=1)
    with pytest.raises(ValueError):
        clumping(x[:, :2], lower=lower, dx=dx, shape=(4, 4, 4), rest_count=1)


def test_volume_loss_charges_compression_and_expansion_not_rotation():
    import math

    from diffmpm_cli.losses import volume_loss

    R = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    shear = torch.tensor([[1.0, 0.7, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # isochoric
    assert float(volume_loss(torch.stack([R, shear, torch.eye(3)]))) < 1e-12
    squeezed = torch.diag(torch.tensor([0.5, 1.0, 1.0]))
    assert math.isclose(float(volume_loss(squeezed[None])), math.log(0.5) ** 2, rel_tol=1e-9)
    inverted = torch.diag(torch.tensor([-1.0, 1.0, 1.0]))
    assert math.isfinite(float(volume_loss(inverted[None])))  # clamped, not NaN
