"""Elastic constitutive models (Kirchhoff stress tau = P F^T) and the polar rotation with its hand-written adjoint
(kernels/materials.py holds the model tables the MPM kernels are built from)."""

import warp as wp

# elastic models (Kirchhoff stress tau = P F^T)

POLAR_EPS = wp.constant(1.0e-6)


@wp.func
def polar_rotation(F: wp.mat33):
    """Rotation R of the polar decomposition F = R S (through wp.svd3, which returns rotations U, V)."""
    U = wp.mat33()
    s = wp.vec3()
    V = wp.mat33()
    wp.svd3(F, U, s, V)
    return U * wp.transpose(V)


@wp.func_grad(polar_rotation)
def adj_polar_rotation(F: wp.mat33, adj_ret: wp.mat33):
    """dR = R Omega with Omega solving S Omega + Omega S = R^T dF - dF^T R; in the V basis Omega'_ij has the
    denominator s_i + s_j (finite at repeated singular values, unlike the separate U and V adjoints of svd3).
    Adjoint: F_bar = R V (K / (s_i + s_j)) V^T with K = A - A^T, A = V^T R^T R_bar V.

    svd3 returns rotations U, V and puts the sign of det F on the smallest singular value, so s_i + s_j >= 0
    always (checked against torch's SVD for inverted F: same gradient to 1e-6). It reaches 0 only where F is
    inverted with s_2 = |s_3|, where R jumps and has no derivative; there the denominator is held at POLAR_EPS,
    so the gradient stays finite but may grow by up to ~1 / POLAR_EPS. Decided: keep it (a state with det F <= 0
    is reported as physically invalid by the metrics, and the line search refuses steps into one) rather than
    clip gradients, which would hide it."""
    U = wp.mat33()
    s = wp.vec3()
    V = wp.mat33()
    wp.svd3(F, U, s, V)
    R = U * wp.transpose(V)
    A = wp.transpose(V) * wp.transpose(R) * adj_ret * V
    K = wp.mat33()
    for i in range(3):
        for j in range(3):
            K[i, j] = (A[i, j] - A[j, i]) / wp.max(s[i] + s[j], POLAR_EPS)
    wp.adjoint[F] += R * V * K * wp.transpose(V)


@wp.func
def fixed_corotated_tau(F: wp.mat33, mu: float, lam: float):
    """tau = 2 mu (F - R) F^T + lam (J - 1) J I."""
    R = polar_rotation(F)
    J = wp.determinant(F)
    return 2.0 * mu * (F - R) * wp.transpose(F) + wp.identity(3, dtype=float) * (lam * (J - 1.0) * J)


@wp.func
def neo_hookean_tau(F: wp.mat33, mu: float, lam: float):
    """tau = mu (F F^T - I) + lam log(J) I (undefined for J <= 0: gives NaN, caught by the solver)."""
    J = wp.determinant(F)
    eye = wp.identity(3, dtype=float)
    return mu * (F * wp.transpose(F) - eye) + eye * (lam * wp.log(J))
