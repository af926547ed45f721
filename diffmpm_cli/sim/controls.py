"""The deformation-gradient controls: learned log strains -> multiplicative control matrices that cannot invert.

A control layer k holds one log strain A_kp [3, 3] per particle (the learned ``dFc``). At the control step t_k the
solver sets F~ = Fc_kp F with

    Fc = exp(dev_b(A) + vol_b(A) I),
    dev_b(A) = dev(A) s / sqrt(s^2 + |dev(A)|^2)          (Frobenius norm below s = max_strain)
    vol_b(A) = v tanh(tr(A) / (3 v))                        (|vol_b| < v = max_volume_strain; 0 when v = 0)

so det Fc = exp(3 vol_b) > 0: a control never inverts a particle. With max_volume_strain 0 (the default) every
control is isochoric, which keeps det F equal to the particles' true volume ratio: the material's own volumetric
stiffness then resists any compression, and mass cannot pile up unseen (an additive F + dFc could shrink the rest
state so that particles crowd into a few cells while det F stays near 1). Both bounds are smooth, so gradients
through them (torch autograd) are exact.

The exponential is ``expm_bounded``: the bounds cap the exponent's Frobenius norm at s + sqrt(3) v, so a fixed
number of squarings brings it below 1/4 and a Taylor series of order 10 is exact to ~1e-14 there, in elementwise
3 x 3 products. ``torch.linalg.matrix_exp`` (its float64 twin in the tests) ran its 3 x 3 products as batched GEMMs:
on an H100 they took ~15 ms of a 52 ms `sphere_to_snowman_gpu` iteration (torch.profiler, BENCHMARKS.md).
"""

from __future__ import annotations

import math

import torch

TAYLOR_ORDER = 10
TAYLOR_NORM = 0.25  # the scaled exponent's Frobenius norm the series is summed at (remainder < 0.25^11 / 11!)


def control_matrices(log_strain: torch.Tensor, *, max_strain: float, max_volume_strain: float = 0.0) -> torch.Tensor:
    """Fc [..., 3, 3] (det > 0) from log strains A [..., 3, 3]; ``max_strain`` bounds the deviatoric part's
    Frobenius norm (> 0), ``max_volume_strain`` the volumetric log strain per layer (>= 0; 0: isochoric)."""
    bounded = bounded_log_strain(log_strain, max_strain=max_strain, max_volume_strain=max_volume_strain)
    return expm_bounded(bounded, norm_bound=max_strain + math.sqrt(3.0) * max_volume_strain)


def _matmul3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for [..., 3, 3] stacks as elementwise products and one sum (no batched GEMM of tiny matrices)."""
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


def expm_bounded(A: torch.Tensor, *, norm_bound: float) -> torch.Tensor:
    """exp(A) [..., 3, 3] for exponents whose Frobenius norm is at most ``norm_bound``: scaled by 2^-k into norm
    <= TAYLOR_NORM (k fixed by the bound, so no data-dependent step), summed by Horner's rule to TAYLOR_ORDER, squared k
    times. Differentiable by torch autograd; equals torch.linalg.matrix_exp to float rounding (tests/test_mpm.py)."""
    k = max(0, math.ceil(math.log2(norm_bound / TAYLOR_NORM))) if norm_bound > TAYLOR_NORM else 0
    X = A / 2.0**k
    eye = torch.eye(3, dtype=A.dtype, device=A.device)
    E = eye + X / TAYLOR_ORDER
    for n in range(TAYLOR_ORDER - 1, 0, -1):
        E = eye + _matmul3(X, E) / n
    for _ in range(k):
        E = _matmul3(E, E)
    return E


def bounded_log_strain(log_strain: torch.Tensor, *, max_strain: float, max_volume_strain: float = 0.0) -> torch.Tensor:
    """dev_b(A) + vol_b(A) I [..., 3, 3]: the logarithm of ``control_matrices``' result."""
    A = log_strain
    eye = torch.eye(3, dtype=A.dtype, device=A.device)
    mean = torch.diagonal(A, dim1=-2, dim2=-1).sum(-1) / 3.0
    dev = A - mean[..., None, None] * eye
    norm2 = (dev * dev).sum(dim=(-2, -1))
    bounded = dev * (max_strain / torch.sqrt(max_strain**2 + norm2))[..., None, None]
    if max_volume_strain > 0:
        bounded = bounded + (max_volume_strain * torch.tanh(mean / max_volume_strain))[..., None, None] * eye
    return bounded
