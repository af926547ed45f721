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
through them (torch autograd, including ``torch.linalg.matrix_exp``) are exact.
"""

from __future__ import annotations

import torch


def control_matrices(log_strain: torch.Tensor, *, max_strain: float, max_volume_strain: float = 0.0) -> torch.Tensor:
    """Fc [..., 3, 3] (det > 0) from log strains A [..., 3, 3]; ``max_strain`` bounds the deviatoric part's
    Frobenius norm (> 0), ``max_volume_strain`` the volumetric log strain per layer (>= 0; 0: isochoric)."""
    return torch.linalg.matrix_exp(bounded_log_strain(log_strain, max_strain=max_strain,
                                                      max_volume_strain=max_volume_strain))


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
