"""Constitutive models of the MLS-MPM step (kernels/mpm.py builds its kernels per model from ``MATERIALS``).

Per model: the Kirchhoff stress tau(F, C; mu, lam, kappa) that P2G scatters, the return mapping Z that G2P applies to
F+ = (I + dt C) F~ (the identity for elastic models), and the function deciding Z's branch (recorded per particle and
replayed in the backward, sim/solver.py). The kernels pass each particle's model parameters as one vec3 (sim/op.py
material_kappa); the scalar models' functions (``MATERIALS``) take its first component as ``kappa``, snow's and
Bingham's the vector (``KERNEL_MODELS`` holds every model in the kernels' signature). Hand-written adjoints
(``wp.func_grad``) where Warp's generated ones fail: the polar rotation and the spectral maps, whose wp.svd3 adjoint
divides by s_i^2 - s_j^2.
"""

import warp as wp

from ..enums import Material

# ----------------------------------------------------------------------------------------------------------------
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


# ---- plastic and fluid models ------------------------------------------------------------------------------------
# Plasticine (von Mises) and sand (Drucker-Prager) keep the elastic part F_e in F: after G2P's F+ = (I + dt C) F~,
# a return mapping projects F+ back onto the yield surface in Hencky (log) strain (Klar et al. 2016, PAC-NeRF). Both
# maps and the Hencky stress are spectral: G = U diag(g(s)) V^T with F = U diag(s) V^T. Their adjoints are written
# by hand (spectral_adjoint): wp.svd3's own adjoint divides by s_i^2 - s_j^2, which is 0 at rest (F = I) where every
# particle starts. The model's third material parameter ``kappa`` is the yield stress tau_Y [Pa] (von_mises), the
# Drucker-Prager coefficient alpha (drucker_prager; alpha = sqrt(2/3) 2 sin(phi) / (3 - sin(phi)) of the friction
# angle phi, made on the host) or the dynamic viscosity eta [Pa s] (newtonian_fluid).

# return-mapping branches (one byte per particle and step when recorded, like the grid update's decisions)
ELASTIC = wp.constant(0)
YIELD = wp.constant(1)
TENSION = wp.constant(2)
NORM_MIN = wp.constant(1.0e-12)  # |e| of a replayed YIELD branch taken at a strain with no deviatoric part
SIGMA_MIN = wp.constant(1.0e-4)  # singular values below this are clamped before the log (det F -> 0: invalid anyway)
SPECTRAL_GAP = wp.constant(1.0e-3)  # |s_i - s_j| <= gap (s_i + s_j): divided differences take their limit


@wp.func
def clamped_log(s: wp.vec3):
    return wp.vec3(wp.log(wp.max(s[0], SIGMA_MIN)), wp.log(wp.max(s[1], SIGMA_MIN)), wp.log(wp.max(s[2], SIGMA_MIN)))


@wp.func
def inv_clamped(s: wp.vec3):
    """d log(max(s, SIGMA_MIN)) / ds per component: 1 / s, or 0 where clamped."""
    out = wp.vec3(0.0)
    for i in range(3):
        if s[i] > SIGMA_MIN:
            out[i] = 1.0 / s[i]
    return out


@wp.func
def spectral_compose(U: wp.mat33, g: wp.vec3, V: wp.mat33):
    return U * wp.diag(g) * wp.transpose(V)


@wp.func
def spectral_adjoint(U: wp.mat33, s: wp.vec3, V: wp.mat33, g: wp.vec3, Jg: wp.mat33, adj_G: wp.mat33):
    """Adjoint of G(F) = U diag(g(s)) V^T (F = U diag(s) V^T, g permutation-equivariant with Jacobian Jg = dg/ds).

    With B = U^T G_bar V: F_bar = U A V^T, A_ii = (Jg^T diag(B))_i and for i != j
    A_ij = 1/2 (g_i - g_j) / (s_i - s_j) (B_ij + B_ji) + 1/2 (g_i + g_j) / (s_i + s_j) (B_ij - B_ji). At a repeated
    singular value the first quotient takes its limit 1/2 (Jg_ii - Jg_ij + Jg_jj - Jg_ji); the second's denominator
    is held at POLAR_EPS as in adj_polar_rotation. Returns (F_bar, diag(B)); diag(B) . dg/dtheta is the adjoint of
    any parameter theta that g depends on."""
    return spectral_adjoint_gap(U, s, V, g, Jg, adj_G, SPECTRAL_GAP)


@wp.func
def spectral_adjoint_gap(U: wp.mat33, s: wp.vec3, V: wp.mat33, g: wp.vec3, Jg: wp.mat33, adj_G: wp.mat33,
                         gap_tol: float):
    """spectral_adjoint with the quotient's limit taken only where |s_i - s_j| <= gap_tol (|s_i| + |s_j|). The limit
    holds for a g smooth between s_i and s_j; a g with a kink there (snow's clamp: s_i inside, s_j beyond its bound)
    needs the quotient itself down to float32's resolution of s (snow_F's adjoint passes SNOW_GAP)."""
    B = wp.transpose(U) * adj_G * V
    b = wp.vec3(B[0, 0], B[1, 1], B[2, 2])
    d = wp.transpose(Jg) * b
    A = wp.mat33(0.0)
    for i in range(3):
        for j in range(3):
            if i == j:
                A[i, j] = d[i]
            else:
                gap = s[i] - s[j]
                a = float(0.0)
                if wp.abs(gap) > gap_tol * (wp.abs(s[i]) + wp.abs(s[j])):
                    a = (g[i] - g[j]) / gap
                else:
                    a = 0.5 * (Jg[i, i] - Jg[i, j] + Jg[j, j] - Jg[j, i])
                c = (g[i] + g[j]) / wp.max(s[i] + s[j], POLAR_EPS)
                A[i, j] = 0.5 * a * (B[i, j] + B[j, i]) + 0.5 * c * (B[i, j] - B[j, i])
    return U * A * wp.transpose(V), b


@wp.func
def hencky_P_spectrum(F: wp.mat33, mu: float, lam: float):
    """(U, s, V, eps, tr eps, clamped s, p) of F = U diag(s) V^T (wp.svd3): the Hencky strain eps = log s (s clamped
    at SIGMA_MIN) and the singular values p of hencky_P, what the stress and its adjoint both start from."""
    U = wp.mat33()
    s = wp.vec3()
    V = wp.mat33()
    wp.svd3(F, U, s, V)
    eps = clamped_log(s)
    tr = eps[0] + eps[1] + eps[2]
    sc = wp.vec3(wp.max(s[0], SIGMA_MIN), wp.max(s[1], SIGMA_MIN), wp.max(s[2], SIGMA_MIN))
    p = wp.cw_div(2.0 * mu * eps + wp.vec3(lam * tr), sc)
    return U, s, V, eps, tr, sc, p


@wp.func
def hencky_P(F: wp.mat33, mu: float, lam: float):
    """First Piola-Kirchhoff stress of StVK on Hencky strain, psi = mu |log s|^2 + lam / 2 (sum log s)^2:
    P = U diag((2 mu eps_i + lam tr eps) / s_i) V^T with eps = log s (s clamped at SIGMA_MIN)."""
    U, s, V, eps, tr, sc, p = hencky_P_spectrum(F, mu, lam)
    return spectral_compose(U, p, V)


@wp.func_grad(hencky_P)
def adj_hencky_P(F: wp.mat33, mu: float, lam: float, adj_ret: wp.mat33):
    U, s, V, eps, tr, sc, p = hencky_P_spectrum(F, mu, lam)
    ds = inv_clamped(s)  # d eps_j / d s_j
    Jp = wp.mat33(0.0)
    for i in range(3):
        for j in range(3):
            dt_ij = lam * ds[j]
            if i == j:
                dt_ij = dt_ij + 2.0 * mu * ds[j]
            Jp[i, j] = dt_ij / sc[i]
        Jp[i, i] = Jp[i, i] - p[i] * ds[i]  # d(1 / s_i) / d s_i = -1 / s_i^2 (0 where clamped)
    F_bar, b = spectral_adjoint(U, s, V, p, Jp, adj_ret)
    wp.adjoint[F] += F_bar
    wp.adjoint[mu] += wp.dot(b, wp.cw_div(2.0 * eps, sc))
    wp.adjoint[lam] += wp.dot(b, wp.cw_div(wp.vec3(tr), sc))


@wp.func
def hencky_spectrum(F: wp.mat33):
    """(U, s, V, tr eps, e, |e|) of F = U diag(s) V^T (wp.svd3) and its Hencky strain eps = log s: the trace and the
    deviatoric part e = eps - tr eps / 3, what every return mapping, its branch and its adjoint start from."""
    U = wp.mat33()
    s = wp.vec3()
    V = wp.mat33()
    wp.svd3(F, U, s, V)
    eps = clamped_log(s)
    tr = eps[0] + eps[1] + eps[2]
    e = eps - wp.vec3(tr / 3.0)
    return U, s, V, tr, e, wp.length(e)


@wp.func
def deviatoric_log_strain(F: wp.mat33):
    """(tr eps, |e|) of the Hencky strain eps = log s of F, e = eps - tr eps / 3."""
    U, s, V, tr, e, n = hencky_spectrum(F)
    return tr, n


@wp.func
def von_mises_branch(F: wp.mat33, mu: float, lam: float, kappa: float):
    """YIELD where the deviatoric Hencky strain |e| exceeds tau_Y / (2 mu), else ELASTIC."""
    tr, n = deviatoric_log_strain(F)
    out = ELASTIC
    if n > kappa / (2.0 * mu):
        out = YIELD
    return out


@wp.func
def von_mises_F(F: wp.mat33, mu: float, lam: float, kappa: float, branch: int):
    """Return mapping of von Mises plasticity in Hencky strain (kappa = yield stress tau_Y [Pa]) along ``branch``
    (von_mises_branch, or a recorded one): YIELD -> F <- U exp(mean(eps) + r e / |e|) V^T with r = tau_Y / (2 mu)
    (the deviatoric log strain e brought back to the yield surface); ELASTIC -> F."""
    U, s, V, tr, e, n = hencky_spectrum(F)
    m = tr / 3.0
    r = kappa / (2.0 * mu)
    out = F
    if branch == YIELD:
        h = wp.vec3(m) + (r / wp.max(n, NORM_MIN)) * e
        out = spectral_compose(U, wp.vec3(wp.exp(h[0]), wp.exp(h[1]), wp.exp(h[2])), V)
    return out


@wp.func_grad(von_mises_F)
def adj_von_mises_F(F: wp.mat33, mu: float, lam: float, kappa: float, branch: int, adj_ret: wp.mat33):
    """Along the branch the forward takes: the identity without yield; with yield, h = mean(eps) 1 + r e_hat gives
    dh/deps = 11^T / 3 + (r / n)(I - 11^T / 3 - e_hat e_hat^T), dg/ds = diag(g) dh/deps diag(1 / s), and
    dg/dr = g * e_hat with dr/dtau_Y = 1 / (2 mu), dr/dmu = -r / mu."""
    U, s, V, tr, e, n = hencky_spectrum(F)
    m = tr / 3.0
    r = kappa / (2.0 * mu)
    if branch == YIELD:
        n = wp.max(n, NORM_MIN)
        eh = e / n
        h = wp.vec3(m) + r * eh
        g = wp.vec3(wp.exp(h[0]), wp.exp(h[1]), wp.exp(h[2]))
        ds = inv_clamped(s)
        third = wp.mat33(1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0,
                         1.0 / 3.0)
        dh = third + (r / n) * (wp.identity(3, dtype=float) - third - wp.outer(eh, eh))
        Jg = wp.diag(g) * dh * wp.diag(ds)
        F_bar, b = spectral_adjoint(U, s, V, g, Jg, adj_ret)
        wp.adjoint[F] += F_bar
        dg_dr = wp.dot(b, wp.cw_mul(g, eh))
        wp.adjoint[kappa] += dg_dr / (2.0 * mu)
        wp.adjoint[mu] += -dg_dr * r / mu
    else:
        wp.adjoint[F] += adj_ret


@wp.func
def drucker_prager_branch(F: wp.mat33, mu: float, lam: float, kappa: float):
    """TENSION where tr eps >= 0; else YIELD where dgamma = |e| + beta alpha tr eps > 0 (beta = 1 + 3 lam / (2 mu));
    else ELASTIC."""
    tr, n = deviatoric_log_strain(F)
    out = ELASTIC
    if tr >= 0.0:
        out = TENSION
    elif n + (1.0 + 1.5 * lam / mu) * kappa * tr > 0.0:
        out = YIELD
    return out


@wp.func
def drucker_prager_F(F: wp.mat33, mu: float, lam: float, kappa: float, branch: int):
    """Return mapping of Drucker-Prager sand in Hencky strain (Klar et al. 2016, no hardening; kappa = alpha) along
    ``branch`` (drucker_prager_branch, or a recorded one): TENSION -> U V^T (stress-free); YIELD ->
    U exp(tr eps / 3 - beta alpha tr eps e / |e|) V^T (onto the cone); ELASTIC -> F."""
    U, s, V, tr, e, n = hencky_spectrum(F)
    beta = 1.0 + 1.5 * lam / mu
    out = F
    if branch == TENSION:
        out = U * wp.transpose(V)
    elif branch == YIELD:
        h = wp.vec3(tr / 3.0) - (beta * kappa * tr / wp.max(n, NORM_MIN)) * e
        out = spectral_compose(U, wp.vec3(wp.exp(h[0]), wp.exp(h[1]), wp.exp(h[2])), V)
    return out


@wp.func_grad(drucker_prager_F)
def adj_drucker_prager_F(F: wp.mat33, mu: float, lam: float, kappa: float, branch: int, adj_ret: wp.mat33):
    """Along the forward's branch: tension -> the polar rotation's adjoint (g = 1); yield -> with c = -beta alpha tr,
    h = tr / 3 1 + c e_hat, dh/deps = 11^T / 3 - beta alpha e_hat 1^T + (c / n)(I - 11^T / 3 - e_hat e_hat^T),
    dg/dc = g * e_hat, dc/dalpha = -beta tr, dc/dlam = -1.5 alpha tr / mu, dc/dmu = 1.5 alpha tr lam / mu^2;
    elastic -> the identity."""
    U, s, V, tr, e, n = hencky_spectrum(F)
    beta = 1.0 + 1.5 * lam / mu
    if branch == TENSION:
        F_bar, b = spectral_adjoint(U, s, V, wp.vec3(1.0), wp.mat33(0.0), adj_ret)
        wp.adjoint[F] += F_bar
    elif branch == YIELD:
        n = wp.max(n, NORM_MIN)
        eh = e / n
        c = -beta * kappa * tr
        h = wp.vec3(tr / 3.0) + c * eh
        g = wp.vec3(wp.exp(h[0]), wp.exp(h[1]), wp.exp(h[2]))
        ds = inv_clamped(s)
        third = wp.mat33(1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0,
                         1.0 / 3.0)
        dh = third - (beta * kappa) * wp.outer(eh, wp.vec3(1.0)) + (c / n) * (
            wp.identity(3, dtype=float) - third - wp.outer(eh, eh))
        Jg = wp.diag(g) * dh * wp.diag(ds)
        F_bar, b = spectral_adjoint(U, s, V, g, Jg, adj_ret)
        wp.adjoint[F] += F_bar
        dg_dc = wp.dot(b, wp.cw_mul(g, eh))
        wp.adjoint[kappa] += -dg_dc * beta * tr
        wp.adjoint[lam] += -dg_dc * 1.5 * kappa * tr / mu
        wp.adjoint[mu] += dg_dc * 1.5 * kappa * tr * lam / (mu * mu)
    else:
        wp.adjoint[F] += adj_ret


@wp.func
def no_branch(F: wp.mat33, mu: float, lam: float, kappa: float):
    """Models without a return mapping (elastic) or with a smooth one (fluid): one branch."""
    return ELASTIC


@wp.func
def fluid_F(F: wp.mat33, mu: float, lam: float, kappa: float, branch: int):
    """A fluid keeps only its volume ratio: F <- J^(1/3) I (J = det F > 0; NaN otherwise, caught by the solver)."""
    return wp.identity(3, dtype=float) * wp.pow(wp.determinant(F), 1.0 / 3.0)


@wp.func
def keep_F(F: wp.mat33, mu: float, lam: float, kappa: float, branch: int):
    """Elastic models: no return mapping."""
    return F


# Kirchhoff stress tau(F, C; mu, lam, kappa) per model (C: the particle's affine velocity, ~ grad v)


@wp.func
def fixed_corotated_stress(F: wp.mat33, C: wp.mat33, mu: float, lam: float, kappa: float):
    return fixed_corotated_tau(F, mu, lam)


@wp.func
def neo_hookean_stress(F: wp.mat33, C: wp.mat33, mu: float, lam: float, kappa: float):
    return neo_hookean_tau(F, mu, lam)


@wp.func
def hencky_stress(F: wp.mat33, C: wp.mat33, mu: float, lam: float, kappa: float):
    """tau = P F^T = U diag(2 mu eps + lam tr eps) U^T (StVK on Hencky strain of the elastic part)."""
    return hencky_P(F, mu, lam) * wp.transpose(F)


@wp.func
def fluid_stress(F: wp.mat33, C: wp.mat33, mu: float, lam: float, kappa: float):
    """Weakly compressible Newtonian fluid: tau = J sigma, sigma = -p I + eta (C + C^T), pressure
    p = -K (J - 1) with bulk modulus K = lam + 2 mu / 3 (of E, nu); eta = kappa [Pa s]."""
    J = wp.determinant(F)
    return wp.identity(3, dtype=float) * ((lam + 2.0 / 3.0 * mu) * (J - 1.0) * J) + (kappa * J) * (C + wp.transpose(C))


# ---- snow (Stomakhin et al. 2013) ---------------------------------------------------------------------------------
# F holds the elastic part F_E; the plastic volume ratio J_P = det F_P is a particle state of its own (MPMState.Jp).
# Parameters (the kernels' vector k): k[0] = hardening xi, k[1] = critical compression theta_c, k[2] = critical
# stretch theta_s. Stress: fixed-corotated on F_E with mu, lam scaled by exp(xi (1 - J_P)). Return mapping: each
# singular value of F_E clamped to [1 - theta_c, 1 + theta_s], J_P <- J_P det F_trial / det F_E (in the G2P kernel).
# Its branch records, per singular value (svd3's order), 2 bits: SNOW_LOW (clamped at 1 - theta_c), SNOW_HIGH
# (clamped at 1 + theta_s) or 0 (inside), bits 2 i .. 2 i + 1 for singular value i.
SNOW_LOW = wp.constant(1)
SNOW_HIGH = wp.constant(2)
# The clamp's divided differences (g_i - g_j) / (s_i - s_j) are taken as they are down to this relative gap: the
# clamp leaves singular values on its bounds, so the next step's s_i, s_j often straddle a bound 1e-5..1e-3 apart,
# where SPECTRAL_GAP's limit (1/2 for one inside, one clamped) is not the quotient (anything in [0, 1]). Equal
# branches give exactly 1 (both inside) or 0 (both on one bound) at any gap; 1e-6 is svd3's float32 resolution.
SNOW_GAP = wp.constant(1.0e-6)


@wp.func
def snow_branch(F: wp.mat33, mu: float, lam: float, k: wp.vec3):
    """Per singular value of F: 1 below 1 - theta_c, 2 above 1 + theta_s, else 0; two bits each (sum b_i 4^i)."""
    U = wp.mat33()
    s = wp.vec3()
    V = wp.mat33()
    wp.svd3(F, U, s, V)
    code = int(0)
    base = int(1)
    for i in range(3):
        if s[i] < 1.0 - k[1]:
            code = code + SNOW_LOW * base
        elif s[i] > 1.0 + k[2]:
            code = code + SNOW_HIGH * base
        base = base * 4
    return code


@wp.func
def snow_bits(branch: int, i: int):
    """Singular value i's two bits of a snow branch code."""
    return (branch >> (2 * i)) & 3


@wp.func
def snow_clamped(s: float, bits: int, k: wp.vec3):
    out = s
    if bits == SNOW_LOW:
        out = 1.0 - k[1]
    elif bits == SNOW_HIGH:
        out = 1.0 + k[2]
    return out


@wp.func
def snow_spectrum(F: wp.mat33, k: wp.vec3, branch: int):
    """(U, s, V, g) of F = U diag(s) V^T (wp.svd3) with g the singular values clamped as ``branch`` says: what snow's
    return mapping and its adjoint both start from."""
    U = wp.mat33()
    s = wp.vec3()
    V = wp.mat33()
    wp.svd3(F, U, s, V)
    g = wp.vec3(snow_clamped(s[0], snow_bits(branch, 0), k), snow_clamped(s[1], snow_bits(branch, 1), k),
                snow_clamped(s[2], snow_bits(branch, 2), k))
    return U, s, V, g


@wp.func
def snow_F(F: wp.mat33, mu: float, lam: float, k: wp.vec3, dt: float, branch: int):
    """Snow's return mapping along ``branch`` (snow_branch, or a recorded one): F_E <- U diag(clamp(s)) V^T with
    each clamped singular value set to its bound (1 - theta_c or 1 + theta_s); F unchanged when none is."""
    out = F
    if branch != 0:
        U, s, V, g = snow_spectrum(F, k, branch)
        out = spectral_compose(U, g, V)
    return out


@wp.func_grad(snow_F)
def adj_snow_F(F: wp.mat33, mu: float, lam: float, k: wp.vec3, dt: float, branch: int, adj_ret: wp.mat33):
    """Along the forward's branch: dg_i/ds_i = 1 where singular value i is inside, 0 where clamped; dg_i/dtheta_c = -1
    where clamped low, dg_i/dtheta_s = 1 where clamped high (the spectral adjoint, its divided differences exact to
    SNOW_GAP); the identity without a clamp."""
    if branch != 0:
        U, s, V, g = snow_spectrum(F, k, branch)
        inside = wp.vec3(float(snow_bits(branch, 0) == 0), float(snow_bits(branch, 1) == 0),
                         float(snow_bits(branch, 2) == 0))
        F_bar, b = spectral_adjoint_gap(U, s, V, g, wp.diag(inside), adj_ret, SNOW_GAP)
        wp.adjoint[F] += F_bar
        low = wp.vec3(float(snow_bits(branch, 0) == SNOW_LOW), float(snow_bits(branch, 1) == SNOW_LOW),
                      float(snow_bits(branch, 2) == SNOW_LOW))
        high = wp.vec3(float(snow_bits(branch, 0) == SNOW_HIGH), float(snow_bits(branch, 1) == SNOW_HIGH),
                       float(snow_bits(branch, 2) == SNOW_HIGH))
        wp.adjoint[k] += wp.vec3(0.0, -wp.dot(b, low), wp.dot(b, high))
    else:
        wp.adjoint[F] += adj_ret


@wp.func
def snow_hardening(k: wp.vec3, Jp: float):
    """exp(xi (1 - J_P)): the factor on mu and lam (hardening under plastic compression, J_P < 1)."""
    return wp.exp(k[0] * (1.0 - Jp))


@wp.func
def snow_stress(F: wp.mat33, C: wp.mat33, mu: float, lam: float, k: wp.vec3, Jp: float):
    """Fixed-corotated tau of F_E with mu, lam scaled by exp(xi (1 - J_P))."""
    h = snow_hardening(k, Jp)
    return fixed_corotated_tau(F, mu * h, lam * h)


# ---- Bingham viscoplastic fluid ----------------------------------------------------------------------------------
# k[0] = yield stress tau_Y [Pa], k[1] = viscosity eta [Pa s]. StVK on Hencky strain of F_E (as von Mises); above
# yield (|e| > r = tau_Y / (2 mu)) the deviatoric Hencky strain relaxes towards the yield surface at the Perzyna rate
# d|e|/dt = -(2 mu |e| - tau_Y) / eta, integrated implicitly over the step: |e| <- (|e| + c r) / (1 + c) with
# c = 2 mu dt / eta. The deviatoric stress above yield is then tau_Y + eta gamma_dot (gamma_dot = the plastic rate of
# |e|): Bingham's law. eta -> 0 gives von Mises, eta -> inf elasticity; unconditionally stable in eta (implicit).


@wp.func
def bingham_F(F: wp.mat33, mu: float, lam: float, k: wp.vec3, dt: float, branch: int):
    """Bingham's viscoplastic return mapping along ``branch`` (von_mises_branch of tau_Y, or a recorded one):
    YIELD -> U exp(mean(eps) + rho e / |e|) V^T with rho = (|e| + c r) / (1 + c); ELASTIC -> F."""
    U, s, V, tr, e, n = hencky_spectrum(F)
    r = k[0] / (2.0 * mu)
    c = 2.0 * mu * dt / k[1]
    out = F
    if branch == YIELD:
        n = wp.max(n, NORM_MIN)
        rho = (n + c * r) / (1.0 + c)
        h = wp.vec3(tr / 3.0) + (rho / n) * e
        out = spectral_compose(U, wp.vec3(wp.exp(h[0]), wp.exp(h[1]), wp.exp(h[2])), V)
    return out


@wp.func_grad(bingham_F)
def adj_bingham_F(F: wp.mat33, mu: float, lam: float, k: wp.vec3, dt: float, branch: int, adj_ret: wp.mat33):
    """Along the forward's branch: with yield, h = mean(eps) 1 + rho e_hat, dh/deps = 11^T / 3 + e_hat e_hat^T / (1 + c)
    + (rho / n)(I - 11^T / 3 - e_hat e_hat^T); drho/dr = c / (1 + c), drho/dc = (r - n) / (1 + c)^2, dr/dtau_Y =
    1 / (2 mu), dr/dmu = -r / mu, dc/deta = -c / eta, dc/dmu = c / mu; dg/drho = g * e_hat. Without: the identity."""
    U, s, V, tr, e, n = hencky_spectrum(F)
    r = k[0] / (2.0 * mu)
    c = 2.0 * mu * dt / k[1]
    if branch == YIELD:
        n = wp.max(n, NORM_MIN)
        eh = e / n
        rho = (n + c * r) / (1.0 + c)
        h = wp.vec3(tr / 3.0) + rho * eh
        g = wp.vec3(wp.exp(h[0]), wp.exp(h[1]), wp.exp(h[2]))
        ds = inv_clamped(s)
        third = wp.mat33(1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0,
                         1.0 / 3.0)
        dh = third + (1.0 / (1.0 + c)) * wp.outer(eh, eh) + (rho / n) * (
            wp.identity(3, dtype=float) - third - wp.outer(eh, eh))
        Jg = wp.diag(g) * dh * wp.diag(ds)
        F_bar, b = spectral_adjoint(U, s, V, g, Jg, adj_ret)
        wp.adjoint[F] += F_bar
        dg_drho = wp.dot(b, wp.cw_mul(g, eh))
        drho_dr = c / (1.0 + c)
        drho_dc = (r - n) / ((1.0 + c) * (1.0 + c))
        wp.adjoint[k] += wp.vec3(dg_drho * drho_dr / (2.0 * mu), -dg_drho * drho_dc * c / k[1], 0.0)
        wp.adjoint[mu] += dg_drho * (-drho_dr * r / mu + drho_dc * c / mu)
    else:
        wp.adjoint[F] += adj_ret


@wp.func
def bingham_branch(F: wp.mat33, mu: float, lam: float, k: wp.vec3):
    """YIELD where the deviatoric Hencky strain exceeds tau_Y / (2 mu) (von Mises' yield surface), else ELASTIC."""
    return von_mises_branch(F, mu, lam, k[0])


@wp.func
def bingham_stress(F: wp.mat33, C: wp.mat33, mu: float, lam: float, k: wp.vec3, Jp: float):
    return hencky_P(F, mu, lam) * wp.transpose(F)


# ---- Herschel-Bulkley (Bingham with a power law) ------------------------------------------------------------------
# k[0] = yield stress tau_Y [Pa], k[1] = consistency K [Pa s^N], k[2] = flow index N (> 0; N = 1 is Bingham with
# eta = K). Above yield the deviatoric stress is tau_Y + K gamma_dot^N: the implicit step of bingham_F with the
# overstress sigma = 2 mu (rho - r) >= 0 (rho the new |e|, r = tau_Y / (2 mu)) a power of the plastic rate
# (|e| - rho) / dt: sigma = K ((|e| - rho) / dt)^N. With S = 2 mu |e| - tau_Y (the elastic trial's overstress) that is
# sigma + 2 mu dt (sigma / K)^(1/N) = S, one scalar equation. In u = log sigma it reads
# Phi(u) = log(e^u + e^(beta + p u)) - log S = 0 with p = 1 / N and beta = log(2 mu dt) - p log K: Phi is convex and
# increasing in u (a log-sum-exp of two lines, slopes 1 and p), so Newton's method from u0 = min(log S, (log S - beta)
# / p), right of the root, converges monotonically; 4 steps reach float32's resolution over mu 1e3..1e6 Pa, dt
# 1e-5..1e-2 s, K 1e-2..1e3, N 0.15..2 and S 1e-3..1e4 Pa (20,000 random draws against 60 steps in float64), the
# kernels take HB_NEWTON_STEPS. The adjoint differentiates the root, not the iterations (implicit function theorem):
# with w1 = e^u / (e^u + e^(beta + p u)), w2 = 1 - w1 and D = w1 + p w2 = dPhi/du,
# drho/d|e| = w1 / D, drho/dtau_Y = (1 - w1 / D) / (2 mu), drho/dmu = -rho / mu + sigma / (2 mu) (2 |e| / S - w2 / mu) / D,
# drho/dK = sigma / (2 mu) w2 p / (K D), drho/dN = -sigma / (2 mu) w2 (log K - u) / (D N^2).
HB_NEWTON_STEPS = wp.constant(6)
HB_OVERSTRESS_MIN = wp.constant(1.0e-30)  # S of a replayed YIELD branch at or below yield (the log needs S > 0)


@wp.func
def herschel_bulkley_rho(n: float, mu: float, k: wp.vec3, dt: float):
    """(rho, drho/dn, drho/dtau_Y, drho/dmu, drho/dK, drho/dN): the new deviatoric log-strain norm of Herschel-Bulkley's
    implicit step from |e| = n (above yield) and its derivatives (the implicit function theorem at the Newton root)."""
    tau_y = k[0]
    K = k[1]
    N = k[2]
    S = wp.max(2.0 * mu * n - tau_y, HB_OVERSTRESS_MIN)
    L = wp.log(S)
    p = 1.0 / N
    beta = wp.log(2.0 * mu * dt) - p * wp.log(K)
    u = wp.min(L, (L - beta) / p)
    for _i in range(HB_NEWTON_STEPS):
        a2 = beta + p * u
        m = wp.max(u, a2)
        e1 = wp.exp(u - m)
        e2 = wp.exp(a2 - m)
        u = u - (m + wp.log(e1 + e2) - L) * (e1 + e2) / (e1 + p * e2)
    a2 = beta + p * u
    m = wp.max(u, a2)
    e1 = wp.exp(u - m)
    e2 = wp.exp(a2 - m)
    w1 = e1 / (e1 + e2)
    w2 = e2 / (e1 + e2)
    D = w1 + p * w2
    sigma = wp.exp(u)
    rho = (tau_y + sigma) / (2.0 * mu)
    q = sigma / (2.0 * mu) / D
    return (rho, w1 / D, (1.0 - w1 / D) / (2.0 * mu), -rho / mu + q * (2.0 * n / S - w2 / mu), q * w2 * p / K,
            -q * w2 * (wp.log(K) - u) / (N * N))


@wp.func
def herschel_bulkley_F(F: wp.mat33, mu: float, lam: float, k: wp.vec3, dt: float, branch: int):
    """Herschel-Bulkley's viscoplastic return mapping along ``branch`` (von_mises_branch of tau_Y, or a recorded one):
    YIELD -> U exp(mean(eps) + rho e / |e|) V^T with rho of herschel_bulkley_rho; ELASTIC -> F."""
    U, s, V, tr, e, n = hencky_spectrum(F)
    out = F
    if branch == YIELD:
        n = wp.max(n, NORM_MIN)
        rho, d_n, d_tau, d_mu, d_K, d_N = herschel_bulkley_rho(n, mu, k, dt)
        h = wp.vec3(tr / 3.0) + (rho / n) * e
        out = spectral_compose(U, wp.vec3(wp.exp(h[0]), wp.exp(h[1]), wp.exp(h[2])), V)
    return out


@wp.func_grad(herschel_bulkley_F)
def adj_herschel_bulkley_F(F: wp.mat33, mu: float, lam: float, k: wp.vec3, dt: float, branch: int,
                           adj_ret: wp.mat33):
    """Along the forward's branch: with yield, h = mean(eps) 1 + rho e_hat, dh/deps = 11^T / 3 + drho/d|e| e_hat
    e_hat^T + (rho / n)(I - 11^T / 3 - e_hat e_hat^T), dg/drho = g * e_hat and rho's derivatives in tau_Y, K, N and mu
    of herschel_bulkley_rho (as adj_bingham_F with drho/d|e| = 1 / (1 + c) there). Without: the identity."""
    U, s, V, tr, e, n = hencky_spectrum(F)
    if branch == YIELD:
        n = wp.max(n, NORM_MIN)
        eh = e / n
        rho, d_n, d_tau, d_mu, d_K, d_N = herschel_bulkley_rho(n, mu, k, dt)
        h = wp.vec3(tr / 3.0) + rho * eh
        g = wp.vec3(wp.exp(h[0]), wp.exp(h[1]), wp.exp(h[2]))
        ds = inv_clamped(s)
        third = wp.mat33(1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0,
                         1.0 / 3.0)
        dh = third + d_n * wp.outer(eh, eh) + (rho / n) * (wp.identity(3, dtype=float) - third - wp.outer(eh, eh))
        Jg = wp.diag(g) * dh * wp.diag(ds)
        F_bar, b = spectral_adjoint(U, s, V, g, Jg, adj_ret)
        wp.adjoint[F] += F_bar
        dg_drho = wp.dot(b, wp.cw_mul(g, eh))
        wp.adjoint[k] += wp.vec3(dg_drho * d_tau, dg_drho * d_K, dg_drho * d_N)
        wp.adjoint[mu] += dg_drho * d_mu
    else:
        wp.adjoint[F] += adj_ret


# per model: (Kirchhoff stress, return mapping applied to F+ after G2P, the mapping's branch decision), each with one
# scalar material parameter kappa (the models of the first materials round, whose functions the tests call directly)
MATERIALS = {
    Material.FIXED_COROTATED: (fixed_corotated_stress, keep_F, no_branch),
    Material.NEO_HOOKEAN: (neo_hookean_stress, keep_F, no_branch),
    Material.VON_MISES: (hencky_stress, von_mises_F, von_mises_branch),
    Material.DRUCKER_PRAGER: (hencky_stress, drucker_prager_F, drucker_prager_branch),
    Material.NEWTONIAN_FLUID: (fluid_stress, fluid_F, no_branch),
}
ELASTIC_MODELS = (Material.FIXED_COROTATED, Material.NEO_HOOKEAN)  # G2P applies no return mapping (keep_F)
# the models whose G2P records a branch per particle
PLASTIC_MODELS = (Material.VON_MISES, Material.DRUCKER_PRAGER, Material.SNOW, Material.BINGHAM)
PLASTIC_VOLUME_MODELS = (Material.SNOW,)  # the models that read and update J_P (MPMState.Jp)


def _vector_model(stress, mapping, branch):
    """A scalar-parameter model's functions in the kernels' signature: the per-particle parameter vector k (vec3;
    the scalar is k[0]), J_P for the stress, dt for the return mapping (both unused here)."""

    @wp.func
    def stress_k(F: wp.mat33, C: wp.mat33, mu: float, lam: float, k: wp.vec3, Jp: float):
        return stress(F, C, mu, lam, k[0])

    @wp.func
    def mapping_k(F: wp.mat33, mu: float, lam: float, k: wp.vec3, dt: float, branch: int):
        return mapping(F, mu, lam, k[0], branch)

    @wp.func
    def branch_k(F: wp.mat33, mu: float, lam: float, k: wp.vec3):
        return branch(F, mu, lam, k[0])

    return stress_k, mapping_k, branch_k


# per model, in the kernels' signature (stress(F, C, mu, lam, k, J_P), mapping(F, mu, lam, k, dt, branch),
# branch(F, mu, lam, k); k: the particle's parameter vector, sim/op.py material_kappa)
KERNEL_MODELS = {
    **{material: _vector_model(*funcs) for material, funcs in MATERIALS.items()},
    Material.SNOW: (snow_stress, snow_F, snow_branch),
    Material.BINGHAM: (bingham_stress, bingham_F, bingham_branch),
}
