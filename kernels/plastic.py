"""Plasticine (von Mises) and sand (Drucker-Prager): the spectral maps on Hencky strain, their hand-written adjoints
(spectral_adjoint) and the Hencky (StVK on log strain) stress (kernels/materials.py holds the model tables)."""

import warp as wp

from .elastic import POLAR_EPS

# ---- plastic and fluid models ------------------------------------------------------------------------------------
# Plasticine (von Mises) and sand (Drucker-Prager) keep the elastic part F_e in F: after G2P's F+ = (I + dt C) F~,
# a return mapping projects F+ back onto the yield surface in Hencky (log) strain (Klar et al. 2016, PAC-NeRF). Both
# maps and the Hencky stress are spectral: G = U diag(g(s)) V^T with F = U diag(s) V^T. Their adjoints are written
# by hand (spectral_adjoint): wp.svd3's own adjoint divides by s_i^2 - s_j^2, which is 0 at rest (F = I) where every
# particle starts. The model's third material parameter ``kappa`` is the yield stress tau_Y [Pa] (von_mises), the
# Drucker-Prager coefficient alpha (drucker_prager; alpha = sqrt(2/3) 2 sin(phi) / (3 - sin(phi)) of the friction
# angle phi, made on the host; the vector form's k[1] is the apex a = c cot(phi) of the cohesion c) or the dynamic
# viscosity eta [Pa s] (newtonian_fluid).

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
def hencky_log_spectrum(F: wp.mat33):
    """(U, s, V, eps, tr eps) of F = U diag(s) V^T (wp.svd3) and its Hencky strain eps = log s (s clamped at
    SIGMA_MIN): what the stress (hencky_P_spectrum) and every return mapping (hencky_spectrum) start from."""
    U = wp.mat33()
    s = wp.vec3()
    V = wp.mat33()
    wp.svd3(F, U, s, V)
    eps = clamped_log(s)
    return U, s, V, eps, eps[0] + eps[1] + eps[2]


@wp.func
def hencky_P_spectrum(F: wp.mat33, mu: float, lam: float):
    """(U, s, V, eps, tr eps, clamped s, p): hencky_log_spectrum and the singular values p of hencky_P, what the
    stress and its adjoint both start from."""
    U, s, V, eps, tr = hencky_log_spectrum(F)
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
    U, s, V, eps, tr = hencky_log_spectrum(F)
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


# Drucker-Prager's parameter vector k: k[0] = alpha (of the friction angle phi), k[1] = a = c cot(phi) [Pa], the mean
# Kirchhoff stress of the cone's apex (Mohr-Coulomb cohesion c moves it into tension; sim/op.py material_kappa). In
# strain terms the apex is the hydrostatic log strain s per axis with (2 mu + 3 lam) s = a; tr' = tr eps - 3 s. At
# c = 0, s = 0 and every line below is the cohesionless model's, bit for bit.


@wp.func
def drucker_prager_apex(mu: float, lam: float, k: wp.vec3):
    """The apex's hydrostatic log strain per axis s = a / (2 mu + 3 lam) (a = k[1] = c cot phi [Pa])."""
    return k[1] / (2.0 * mu + 3.0 * lam)


@wp.func
def drucker_prager_branch_k(F: wp.mat33, mu: float, lam: float, k: wp.vec3):
    """TENSION where tr' = tr eps - 3 s >= 0 (beyond the apex); else YIELD where dgamma = |e| + beta alpha tr' > 0
    (beta = 1 + 3 lam / (2 mu), alpha = k[0]); else ELASTIC."""
    tr, n = deviatoric_log_strain(F)
    trs = tr - 3.0 * drucker_prager_apex(mu, lam, k)
    out = ELASTIC
    if trs >= 0.0:
        out = TENSION
    elif n + (1.0 + 1.5 * lam / mu) * k[0] * trs > 0.0:
        out = YIELD
    return out


@wp.func
def drucker_prager_F_k(F: wp.mat33, mu: float, lam: float, k: wp.vec3, dt: float, branch: int):
    """Return mapping of Drucker-Prager sand in Hencky strain (Klar et al. 2016, no hardening; k = (alpha, a, -),
    a = c cot phi the apex's mean stress [Pa]) along ``branch`` (drucker_prager_branch_k, or a recorded one):
    TENSION -> e^s U V^T (the apex); YIELD -> U exp(tr eps / 3 - beta alpha tr' e / |e|) V^T (onto the cone, trace
    kept); ELASTIC -> F. dt is unused (the kernels' signature)."""
    U, s, V, tr, e, n = hencky_spectrum(F)
    beta = 1.0 + 1.5 * lam / mu
    apex = drucker_prager_apex(mu, lam, k)
    trs = tr - 3.0 * apex
    out = F
    if branch == TENSION:
        out = wp.exp(apex) * (U * wp.transpose(V))
    elif branch == YIELD:
        h = wp.vec3(tr / 3.0) - (beta * k[0] * trs / wp.max(n, NORM_MIN)) * e
        out = spectral_compose(U, wp.vec3(wp.exp(h[0]), wp.exp(h[1]), wp.exp(h[2])), V)
    return out


@wp.func_grad(drucker_prager_F_k)
def adj_drucker_prager_F_k(F: wp.mat33, mu: float, lam: float, k: wp.vec3, dt: float, branch: int,
                           adj_ret: wp.mat33):
    """Along the forward's branch: tension -> G = g U V^T with g = e^s: g times the polar rotation's adjoint, and
    adj s = g <adj_G, U V^T>; yield -> with c = -beta alpha tr' (tr' = tr - 3 s), h = tr / 3 1 + c e_hat,
    dh/deps = 11^T / 3 - beta alpha e_hat 1^T + (c / n)(I - 11^T / 3 - e_hat e_hat^T), dg/dc = g * e_hat,
    dc/dalpha = -beta tr', dc/dlam = -1.5 alpha tr' / mu, dc/dmu = 1.5 alpha tr' lam / mu^2, dc/ds = 3 beta alpha;
    elastic -> the identity. Then s = a / (2 mu + 3 lam): ds/da = 1 / (2 mu + 3 lam), ds/dmu = -2 s / (2 mu + 3 lam),
    ds/dlam = -3 s / (2 mu + 3 lam)."""
    U, s, V, tr, e, n = hencky_spectrum(F)
    beta = 1.0 + 1.5 * lam / mu
    alpha = k[0]
    apex = drucker_prager_apex(mu, lam, k)
    trs = tr - 3.0 * apex
    adj_apex = float(0.0)
    if branch == TENSION:
        g_apex = wp.exp(apex)
        F_bar, b = spectral_adjoint(U, s, V, wp.vec3(g_apex), wp.mat33(0.0), adj_ret)
        wp.adjoint[F] += F_bar
        adj_apex = g_apex * (b[0] + b[1] + b[2])  # <adj_G, U V^T> = tr(U^T adj_G V)
    elif branch == YIELD:
        n = wp.max(n, NORM_MIN)
        eh = e / n
        c = -beta * alpha * trs
        h = wp.vec3(tr / 3.0) + c * eh
        g = wp.vec3(wp.exp(h[0]), wp.exp(h[1]), wp.exp(h[2]))
        ds = inv_clamped(s)
        third = wp.mat33(1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0,
                         1.0 / 3.0)
        dh = third - (beta * alpha) * wp.outer(eh, wp.vec3(1.0)) + (c / n) * (
            wp.identity(3, dtype=float) - third - wp.outer(eh, eh))
        Jg = wp.diag(g) * dh * wp.diag(ds)
        F_bar, b = spectral_adjoint(U, s, V, g, Jg, adj_ret)
        wp.adjoint[F] += F_bar
        dg_dc = wp.dot(b, wp.cw_mul(g, eh))
        wp.adjoint[k] += wp.vec3(-dg_dc * beta * trs, 0.0, 0.0)
        wp.adjoint[lam] += -dg_dc * 1.5 * alpha * trs / mu
        wp.adjoint[mu] += dg_dc * 1.5 * alpha * trs * lam / (mu * mu)
        adj_apex = dg_dc * 3.0 * beta * alpha
    else:
        wp.adjoint[F] += adj_ret
    modulus = 2.0 * mu + 3.0 * lam
    wp.adjoint[k] += wp.vec3(0.0, adj_apex / modulus, 0.0)
    wp.adjoint[mu] += -2.0 * adj_apex * apex / modulus
    wp.adjoint[lam] += -3.0 * adj_apex * apex / modulus


@wp.func
def drucker_prager_branch(F: wp.mat33, mu: float, lam: float, kappa: float):
    """drucker_prager_branch_k without cohesion (kappa = alpha, the apex at 0)."""
    return drucker_prager_branch_k(F, mu, lam, wp.vec3(kappa, 0.0, 0.0))


@wp.func
def drucker_prager_F(F: wp.mat33, mu: float, lam: float, kappa: float, branch: int):
    """drucker_prager_F_k without cohesion (kappa = alpha, the apex at 0; its adjoint runs through
    adj_drucker_prager_F_k)."""
    return drucker_prager_F_k(F, mu, lam, wp.vec3(kappa, 0.0, 0.0), 0.0, branch)
