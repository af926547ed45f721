"""Snow (Stomakhin et al. 2013), Bingham and Herschel-Bulkley viscoplastic flow: the models whose parameters are the
kernels' whole per-particle vector k (kernels/materials.py holds the model tables)."""

import warp as wp

from .elastic import fixed_corotated_tau
from .plastic import (
    NORM_MIN,
    YIELD,
    hencky_P,
    hencky_spectrum,
    inv_clamped,
    spectral_adjoint,
    spectral_adjoint_gap,
    spectral_compose,
    von_mises_branch,
)

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
def snow_clamp_jvp(F: wp.mat33, D: wp.mat33d, k: wp.vec3, branch: int):
    """The directional derivatives at F (a recorded F_trial) along D of snow's clamp G = U diag(g(s)) V^T (singular
    values clamped as ``branch`` says) and of J_P's factor h = det F / det G, in float64 (gradient checks only: check-grad's
    probes linearise the clamp at the base rollout's F_trial, kernels/mpm.py g2p).

    Written from the SVD's own derivative, not from the adjoint's divided differences: with F = U S V^T (wp.svd3 in
    float64 of the float32 F) and K = U^T D V, ds_i = K_ii, and U^T dU = W_U, V^T dV = W_V (antisymmetric) solve
    K_ij = W_U,ij s_j - s_i W_V,ij, K_ji = s_j W_V,ij - W_U,ij s_i; then dG = U (diag(dg) + W_U diag(g) - diag(g) W_V) V^T
    with dg_i = K_ii inside, 0 clamped. Off the diagonal that is
    M_ij = [K_ij (g_j s_j - g_i s_i) + K_ji (g_j s_i - g_i s_j)] / (s_j^2 - s_i^2), which is K_ij where both are inside
    (g = s) and g (K_ij - K_ji) / (s_i + s_j) where both sit on one bound g (exactly, at any gap); the quotient is
    taken as it is only where their branches differ. h = prod over clamped i of s_i / g_i, dh = h sum K_ii / s_i over
    the clamped. Returns (dG, dh)."""
    Fd = wp.mat33d(F)
    U = wp.mat33d()
    s = wp.vec3d()
    V = wp.mat33d()
    wp.svd3(Fd, U, s, V)
    K = wp.transpose(U) * D * V
    bits = wp.vec3i(snow_bits(branch, 0), snow_bits(branch, 1), snow_bits(branch, 2))
    g = wp.vec3d(wp.float64(snow_clamped(float(s[0]), bits[0], k)), wp.float64(snow_clamped(float(s[1]), bits[1], k)),
                 wp.float64(snow_clamped(float(s[2]), bits[2], k)))
    M = wp.mat33d()
    h = wp.float64(1.0)
    rate = wp.float64(0.0)
    for i in range(3):
        if bits[i] == 0:
            g[i] = s[i]  # inside: the float64 value itself
            M[i, i] = K[i, i]
        else:
            h = h * s[i] / g[i]
            rate = rate + K[i, i] / s[i]
    for i in range(3):
        for j in range(3):
            if i != j:
                if bits[i] == 0 and bits[j] == 0:
                    M[i, j] = K[i, j]
                elif bits[i] == bits[j]:
                    M[i, j] = g[i] * (K[i, j] - K[j, i]) / (s[i] + s[j])
                else:
                    gap = s[j] - s[i]
                    if gap == wp.float64(0.0):  # different branches at one value: only a record at a bound's edge
                        gap = wp.float64(1.0e-300)
                    M[i, j] = (K[i, j] * (g[j] * s[j] - g[i] * s[i]) + K[j, i] * (g[j] * s[i] - g[i] * s[j])) / (
                        gap * (s[j] + s[i]))
    return U * M * wp.transpose(V), h * rate


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
    1 / (2 mu), dr/dmu = -r / mu, dc/deta = -c / eta, dc/dmu = c / mu; dg/drho = g * e_hat; k[2]: the derivative in
    Herschel-Bulkley's flow index N at N = 1. Without: the identity."""
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
        # Herschel-Bulkley's flow index N at N = 1 (bingham_hb_F takes this map there): with the overstress
        # sigma = 2 mu (rho - r) = K gamma_dot, drho/dN = sigma c / (2 mu (1 + c)) log(sigma / K) (herschel_bulkley_rho's
        # d_N at N = 1, where D = 1 and w2 = c / (1 + c)); 0 at or below yield, as that map's continuation
        sigma = 2.0 * mu * (rho - r)
        drho_dN = float(0.0)
        if sigma > 0.0:
            drho_dN = sigma * c / (2.0 * mu * (1.0 + c)) * wp.log(sigma / k[1])
        wp.adjoint[k] += wp.vec3(dg_drho * drho_dr / (2.0 * mu), -dg_drho * drho_dc * c / k[1], dg_drho * drho_dN)
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
    d_n = w1 / D
    d_tau = (1.0 - w1 / D) / (2.0 * mu)
    d_mu = -rho / mu + q * (2.0 * n / S - w2 / mu)
    d_K = q * w2 * p / K
    d_N = -q * w2 * (wp.log(K) - u) / (N * N)
    if 2.0 * mu * n - tau_y <= HB_OVERSTRESS_MIN:
        # a replayed YIELD branch at or below yield (a perturbed rollout with frozen decisions): continue the map C1
        # through S = 0. For N < 1 the root leaves S = 0 as sigma ~ S (the power term is of higher order): continue
        # with sigma = S, i.e. rho = |e| (the elastic step); for N >= 1 as sigma ~ (S / (2 mu dt / K^(1/N)))^N, flat:
        # continue with sigma = 0, rho = r. (Clamping S alone left a kink of slope 1 -> 0 in rho(|e|) at N < 1, which
        # central differences across the yield surface saw: 13 % off AD in log tau_Y at N 0.5.)
        d_K = 0.0
        d_N = 0.0
        if N < 1.0:
            rho = n
            d_n = 1.0
            d_tau = 0.0
            d_mu = 0.0
        else:
            rho = tau_y / (2.0 * mu)
            d_n = 0.0
            d_tau = 1.0 / (2.0 * mu)
            d_mu = -rho / mu
    return rho, d_n, d_tau, d_mu, d_K, d_N


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


@wp.func
def bingham_hb_F(F: wp.mat33, mu: float, lam: float, k: wp.vec3, dt: float, branch: int):
    """The bingham model's return mapping, k = (tau_Y, K, N): Bingham's closed form (bingham_F, eta = K) where the
    flow index N is exactly 1, so every Bingham scene steps bit for bit as before the flow index existed; Herschel-
    Bulkley's Newton solve (herschel_bulkley_F) otherwise. N is a scene constant; its derivative exists on both
    sides (at N = 1 bingham_F's adjoint forms Herschel-Bulkley's)."""
    out = F
    if k[2] == 1.0:
        out = bingham_F(F, mu, lam, k, dt, branch)
    else:
        out = herschel_bulkley_F(F, mu, lam, k, dt, branch)
    return out
