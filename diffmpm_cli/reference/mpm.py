"""Slow, obvious float64 twins of the MPM transfers: every particle against every grid node."""

from __future__ import annotations

import torch

from ..enums import WallKind


def bspline_ref(d: torch.Tensor, order: str) -> torch.Tensor:
    """The 1-D B-spline N(d) at signed distances d (in cells): quadratic support |d| < 1.5, cubic |d| < 2."""
    a = d.abs()
    if order == "quadratic":
        return torch.where(a < 0.5, 0.75 - a**2, torch.where(a < 1.5, 0.5 * (1.5 - a) ** 2, torch.zeros_like(a)))
    if order == "cubic":
        return torch.where(a < 1.0, 0.5 * a**3 - a**2 + 2.0 / 3.0,
                           torch.where(a < 2.0, (2.0 - a) ** 3 / 6.0, torch.zeros_like(a)))
    raise ValueError(order)


def grid_mass_ref(positions: torch.Tensor, masses: torch.Tensor, *, lower, dx: float, shape, order: str) -> torch.Tensor:
    """Dense grid mass: m_i = sum_p m_p prod_axes N((x_p - x_i) / dx), float64, shape ``shape``."""
    x = (positions.to(torch.float64) - torch.as_tensor(lower, dtype=torch.float64)) / dx
    weights = [bspline_ref(x[:, a, None] - torch.arange(shape[a], dtype=torch.float64)[None, :], order)
               for a in range(3)]
    return torch.einsum("p,pi,pj,pk->ijk", masses.to(torch.float64), *weights)


# ----------------------------------------------------------------------------------------------------------------
# one MLS-MPM step, dense: every particle against every grid node (the semantics of kernels/mpm.py)

INERTIA = {"quadratic": 4.0, "cubic": 3.0}


def polar_rotation_ref(F: torch.Tensor) -> torch.Tensor:
    """R of F = R S, a proper rotation (det +1) as wp.svd3 gives it."""
    U, _, Vh = torch.linalg.svd(F)
    sign = torch.sign(torch.linalg.det(U @ Vh))
    D = torch.diag_embed(torch.stack([torch.ones_like(sign), torch.ones_like(sign), sign], dim=-1))
    return U @ D @ Vh


def polar_newton_ref(F: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """R of F = R S by Newton's iteration R <- (R + R^-T) / 2 from R = F (det F > 0): matmuls and inverses only, so
    its autograd is defined at repeated singular values, where the SVD's is not."""
    R = F
    for _ in range(iterations):
        R = 0.5 * (R + torch.linalg.inv(R).transpose(-1, -2))
    return R


SIGMA_MIN = 1.0e-4  # kernels/mpm.py: singular values are clamped here before the log


def hencky_strain_ref(F: torch.Tensor):
    """(U, eps = log s, Vh) of F = U diag(s) Vh (torch's SVD; its gradient needs distinct singular values, which
    the twin's random states have; det F > 0, so U diag(g) Vh is unique)."""
    U, S, Vh = torch.linalg.svd(F)
    return U, torch.log(S.clamp_min(SIGMA_MIN)), Vh


def spd_log_ref(b: torch.Tensor, *, roots: int = 5, iterations: int = 12, terms: int = 14) -> torch.Tensor:
    """Matrix log of symmetric positive definite b [N, 3, 3] by inverse scaling and squaring: ``roots`` square roots
    (Denman-Beavers iterations) bring b near I, then the series of log(I + X). Only matmuls and inverses: its
    autograd is defined at repeated eigenvalues (a rotated F, F = I), where an eigen- or SVD-based gradient is not."""
    eye = torch.eye(3, dtype=b.dtype).expand_as(b)
    a = b
    for _ in range(roots):
        y, z = a, eye
        for _ in range(iterations):
            y, z = 0.5 * (y + torch.linalg.inv(z)), 0.5 * (z + torch.linalg.inv(y))
        a = y
    x = a - eye
    out, power = torch.zeros_like(b), eye
    for k in range(1, terms + 1):
        power = power @ x
        out = out + ((-1) ** (k + 1) / k) * power
    return out * 2**roots


def spectral_ref(U: torch.Tensor, g: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    return U @ torch.diag_embed(g) @ Vh


def kappa_column(kappa: torch.Tensor, i: int) -> torch.Tensor:
    """Parameter i of the per-particle parameter vectors kappa [N, 3] (a scalar-parameter model's [N]: column 0)."""
    return kappa if kappa.dim() == 1 else kappa[:, i]


def kirchhoff_ref(F: torch.Tensor, mu: torch.Tensor, lam: torch.Tensor, model: str, *, C: torch.Tensor | None = None,
                  kappa: torch.Tensor | None = None, Jp: torch.Tensor | None = None) -> torch.Tensor:
    """tau = P(F) F^T, [N, 3, 3]: fixed-corotated, neo-Hookean, StVK on Hencky strain (von_mises, drucker_prager,
    bingham: U diag(2 mu eps + lam tr eps) U^T), the Newtonian fluid (K (J - 1) J I + eta J (C + C^T),
    K = lam + 2 mu / 3, eta = kappa; needs C) or snow (fixed-corotated with mu, lam times exp(xi (1 - J_P)),
    xi = kappa[:, 0]; needs Jp)."""
    eye = torch.eye(3, dtype=F.dtype, device=F.device).expand_as(F)
    J = torch.linalg.det(F)
    if model == "snow":  # F_E often has repeated singular values (two clamped to one bound): Newton's polar rotation
        h = torch.exp(kappa_column(kappa, 0) * (1 - Jp))
        R = polar_newton_ref(F)
        return 2 * (mu * h)[:, None, None] * (F - R) @ F.transpose(1, 2) + (lam * h * (J - 1) * J)[:, None, None] * eye
    if model in ("von_mises", "drucker_prager", "bingham"):  # 2 mu log V + lam tr(log V) I with log V = log(F F^T) / 2
        log_v = 0.5 * spd_log_ref(F @ F.transpose(1, 2))
        return 2 * mu[:, None, None] * log_v + (lam * torch.einsum("pii->p", log_v))[:, None, None] * eye
    if model == "newtonian_fluid":
        return (((lam + 2.0 / 3.0 * mu) * (J - 1) * J)[:, None, None] * eye
                + (kappa_column(kappa, 0) * J)[:, None, None] * (C + C.transpose(1, 2)))
    if model == "fixed_corotated":
        R = polar_rotation_ref(F)
        return 2 * mu[:, None, None] * (F - R) @ F.transpose(1, 2) + (lam * (J - 1) * J)[:, None, None] * eye
    if model == "neo_hookean":
        return mu[:, None, None] * (F @ F.transpose(1, 2) - eye) + (lam * torch.log(J))[:, None, None] * eye
    raise ValueError(model)


def energy_density_ref(F: torch.Tensor, mu: torch.Tensor, lam: torch.Tensor, model: str) -> torch.Tensor:
    """Elastic energy per rest volume psi(F) [Pa], [N] (snow: of F_E without its hardening factor)."""
    J = torch.linalg.det(F)
    if model in ("fixed_corotated", "snow"):
        R = polar_rotation_ref(F)
        return mu * ((F - R) ** 2).sum(dim=(1, 2)) + 0.5 * lam * (J - 1) ** 2
    if model == "neo_hookean":
        logJ = torch.log(J)
        return 0.5 * mu * ((F**2).sum(dim=(1, 2)) - 3) - mu * logJ + 0.5 * lam * logJ**2
    if model in ("von_mises", "drucker_prager", "bingham"):
        eps = torch.log(torch.linalg.svdvals(F).clamp_min(SIGMA_MIN))
        return mu * (eps**2).sum(-1) + 0.5 * lam * eps.sum(-1) ** 2
    if model == "newtonian_fluid":  # the pressure's potential: tau = K (J - 1) J I = J dpsi/dJ I
        return 0.5 * (lam + 2.0 / 3.0 * mu) * (J - 1) ** 2
    raise ValueError(model)


def snow_ref(F: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """Snow's clamp: U diag(clamp(s, 1 - theta_c, 1 + theta_s)) Vh where any singular value lies outside, else F
    (kappa [N, 3] = xi, theta_c, theta_s)."""
    U, S, Vh = torch.linalg.svd(F)
    low, high = 1 - kappa[:, 1:2], 1 + kappa[:, 2:3]
    clamped = torch.minimum(torch.maximum(S, low), high)
    outside = ((S < low) | (S > high)).any(-1)
    return torch.where(outside[:, None, None], spectral_ref(U, clamped, Vh), F)


def snow_volume_factor_ref(F: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """J_P's factor of snow's return mapping, det F / det snow_ref(F) (J_P <- J_P det F_trial / det F_E) [N]."""
    return torch.linalg.det(F) / torch.linalg.det(snow_ref(F, kappa))


def snow_linearised_ref(F: torch.Tensor, F_star: torch.Tensor, kappa: torch.Tensor):
    """Snow's clamp and J_P factor linearised at ``F_star`` (check-grad's probes, kernels/mpm.py snow_linearised):
    (G(F*) + dG(F*)[F - F*], h(F*) + dh(F*)[F - F*]) with G = snow_ref and h = snow_volume_factor_ref, the directional
    derivatives by forward-mode autodiff (torch.func.jvp through torch's SVD: not at exactly repeated singular
    values)."""

    def both(X):
        return snow_ref(X, kappa), snow_volume_factor_ref(X, kappa)

    (G, h), (dG, dh) = torch.func.jvp(both, (F_star,), (F - F_star,))
    return G + dG, h + dh


def return_mapping_ref(F: torch.Tensor, mu: torch.Tensor, lam: torch.Tensor, kappa: torch.Tensor,
                       model: str, *, dt: float | None = None) -> torch.Tensor:
    """The projection kernels/mpm.py applies to F+ after G2P (elastic models: none). von_mises (kappa = yield stress),
    drucker_prager (kappa = alpha, or (alpha, apex a = c cot phi [Pa], -)), newtonian_fluid (F <- J^(1/3) I), snow
    (snow_ref), bingham (kappa = yield stress, viscosity or consistency K, flow index N: Bingham's closed form where
    N = 1, herschel_bulkley_ref elsewhere; needs dt); branches by torch.where. kappa: [N] or the parameter vectors
    [N, 3]."""
    if model in ("fixed_corotated", "neo_hookean"):
        return F
    if model == "snow":
        return snow_ref(F, kappa)
    if model == "newtonian_fluid":
        J = torch.linalg.det(F)
        return J.pow(1.0 / 3.0)[:, None, None] * torch.eye(3, dtype=F.dtype).expand_as(F)
    U, eps, Vh = hencky_strain_ref(F)
    tr = eps.sum(-1)
    e = eps - (tr / 3)[:, None]
    n = e.norm(dim=-1)
    safe_n = torch.where(n > 0, n, torch.ones_like(n))[:, None]
    if model == "von_mises":
        r = kappa_column(kappa, 0) / (2 * mu)
        h = (tr / 3)[:, None] + r[:, None] * e / safe_n
        return torch.where((n > r)[:, None, None], spectral_ref(U, torch.exp(h), Vh), F)
    if model == "bingham":  # Perzyna: |e| <- (|e| + c r) / (1 + c), c = 2 mu dt / eta; Herschel-Bulkley where N != 1
        r = kappa_column(kappa, 0) / (2 * mu)
        c = 2 * mu * dt / kappa_column(kappa, 1)
        rho = (n + c * r) / (1 + c)
        h = (tr / 3)[:, None] + rho[:, None] * e / safe_n
        out = torch.where((n > r)[:, None, None], spectral_ref(U, torch.exp(h), Vh), F)
        flow_index = kappa_column(kappa, 2) if kappa.dim() == 2 else torch.ones_like(n)
        power = flow_index != 1
        if bool(power.any()):  # the kernels' bingham_hb_F: Bingham's closed form at N = 1 exactly
            safe = torch.where(power[:, None], kappa, torch.ones_like(kappa))
            out = torch.where(power[:, None, None], herschel_bulkley_ref(F, mu, safe, dt), out)
        return out
    if model == "drucker_prager":  # kappa [N, 3] = (alpha, apex a = c cot phi [Pa], -); kappa [N]: alpha, a = 0
        beta = 1 + 1.5 * lam / mu
        alpha = kappa_column(kappa, 0)
        apex = kappa[:, 1] / (2 * mu + 3 * lam) if kappa.dim() == 2 else torch.zeros_like(tr)  # log strain per axis
        trs = tr - 3 * apex
        h = (tr / 3)[:, None] - (beta * alpha * trs)[:, None] * e / safe_n
        yielded = torch.where((n + beta * alpha * trs > 0)[:, None, None], spectral_ref(U, torch.exp(h), Vh), F)
        return torch.where((trs >= 0)[:, None, None], torch.exp(apex)[:, None, None] * (U @ Vh), yielded)
    raise ValueError(model)


def herschel_bulkley_ref(F: torch.Tensor, mu: torch.Tensor, kappa: torch.Tensor, dt: float,
                         iterations: int = 60) -> torch.Tensor:
    """Herschel-Bulkley's return mapping (kernels/materials.py herschel_bulkley_F), kappa [N, 3] = (tau_Y [Pa],
    consistency K [Pa s^N], flow index N): where |e| > r = tau_Y / (2 mu), |e| <- rho with the overstress
    sigma = 2 mu (rho - r) solving sigma + 2 mu dt (sigma / K)^(1/N) = 2 mu |e| - tau_Y (the deviatoric stress
    tau_Y + K ((|e| - rho) / dt)^N). Solved by ``iterations`` Newton steps on log sigma from log(2 mu |e| - tau_Y);
    autograd runs through the iterations (not the implicit function theorem the kernels' adjoint uses)."""
    U, eps, Vh = hencky_strain_ref(F)
    tr = eps.sum(-1)
    e = eps - (tr / 3)[:, None]
    n = e.norm(dim=-1)
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    tau_y, K, N = kappa[:, 0], kappa[:, 1], kappa[:, 2]
    yields = n > tau_y / (2 * mu)
    S = torch.where(yields, 2 * mu * safe_n - tau_y, torch.ones_like(n))
    u = torch.log(S)
    for _ in range(iterations):
        plastic = 2 * mu * dt * (torch.exp(u) / K) ** (1 / N)
        total = torch.exp(u) + plastic
        u = u - (torch.log(total) - torch.log(S)) * total / (torch.exp(u) + plastic / N)
    rho = (tau_y + torch.exp(u)) / (2 * mu)
    h = (tr / 3)[:, None] + (rho / safe_n)[:, None] * e
    return torch.where(yields[:, None, None], spectral_ref(U, torch.exp(h), Vh), F)


def per_model(models, codes: torch.Tensor | None, fn, count: int, *inputs: torch.Tensor) -> torch.Tensor:
    """fn(model, rows, *inputs[rows]) for each of ``models`` over the particles whose code (``codes`` [N], the index of
    a particle's model; None: all model 0) names it, scattered back into one [N, ...] result. Each model sees only
    its own particles (another model's formula at a particle's state may be undefined: neo-Hookean's log J)."""
    if len(models) == 1 or codes is None:
        return fn(models[0], None, *inputs)
    out = None
    for index, model in enumerate(models):
        rows = torch.nonzero(codes == index).flatten()
        if not len(rows):
            continue
        part = fn(model, rows, *(t[rows] if t is not None and t.dim() else t for t in inputs))
        if out is None:
            out = torch.zeros((count, *part.shape[1:]), dtype=part.dtype)
        out = out.index_put((rows,), part)
    return out


def _apply_wall(v: torch.Tensor, axis: int, kind: WallKind, outward: float, where: torch.Tensor) -> torch.Tensor:
    e = torch.zeros(3, dtype=v.dtype)
    e[axis] = 1.0
    vn = v @ e
    if kind == WallKind.STICKY:
        new = torch.zeros_like(v)
    elif kind == WallKind.SLIP:
        new = v - vn[:, None] * e
    elif kind == WallKind.SEPARATE:
        new = torch.where((vn * outward > 0)[:, None], v - vn[:, None] * e, v)
    else:
        raise ValueError(kind)
    return torch.where(where[:, None], new, v)


def step_ref(state: dict, *, model, mass: torch.Tensor, volume: torch.Tensor, mu: torch.Tensor, lam: torch.Tensor,
             Fc_t: torch.Tensor | None, node_mass_eps: float, kappa: torch.Tensor | None = None,
             codes: torch.Tensor | None = None) -> dict:
    """One step of ``kernels/mpm.py`` in float64 torch, every particle against every node. ``state``: x, v, F, C and
    optionally Jp (snow's plastic volume ratio, default 1); kappa [N, 3]: the parameter vectors (sim/op.py
    material_kappa, scene_kappa; None: zeros); codes [N]: each particle's model, its index in ``model.models``
    (several models; None: all ``model.material``)."""
    models = tuple(getattr(model, "models", ()) or (model.material,))
    g = model.grid
    dt = model.dt
    x, v, F, C = (state[k] for k in ("x", "v", "F", "C"))
    Jp = state.get("Jp", torch.ones(len(x), dtype=x.dtype))
    dtype = x.dtype
    lower = torch.as_tensor(g.lower, dtype=dtype)
    eye = torch.eye(3, dtype=dtype)
    # weights [N, G] and offsets node - x [N, G, 3]
    rel = (x - lower) / g.dx
    axes = [torch.arange(n, dtype=dtype) for n in g.shape]
    wx, wy, wz = (bspline_ref(rel[:, a, None] - axes[a][None, :], model.bspline) for a in range(3))
    w = (wx[:, :, None, None] * wy[:, None, :, None] * wz[:, None, None, :]).reshape(len(x), -1)
    index = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    nodes = lower + index * g.dx
    dpos = nodes[None, :, :] - x[:, None, :]
    inv_d = INERTIA[model.bspline] / g.dx**2
    # stress and P2G
    Ft = Fc_t @ F if Fc_t is not None else F
    kappa = torch.zeros(len(x), 3, dtype=dtype) if kappa is None else kappa
    tau = per_model(models, codes, lambda m, _, F_, mu_, lam_, C_, k_, J_: kirchhoff_ref(F_, mu_, lam_, m, C=C_,
                                                                                        kappa=k_, Jp=J_),
                    len(x), Ft, mu, lam, C, kappa, Jp)
    if model.bulk_viscosity > 0:
        tau = tau + model.bulk_viscosity * torch.einsum("pii->p", C)[:, None, None] * eye
    affine = mass[:, None, None] * C - (dt * volume * inv_d)[:, None, None] * tau
    grid_mass = (w * mass[:, None]).sum(0)
    grid_momentum = (w[:, :, None] * (mass[:, None, None] * v[:, None, :]
                                      + torch.einsum("pij,pgj->pgi", affine, dpos))).sum(0)
    # grid update
    filled = grid_mass > node_mass_eps
    safe_mass = torch.where(filled, grid_mass, torch.ones_like(grid_mass))
    vg = torch.where(filled[:, None], grid_momentum / safe_mass[:, None] + dt * torch.as_tensor(model.gravity, dtype=dtype),
                     torch.zeros_like(grid_momentum))
    if model.floor_enabled:
        n = torch.as_tensor(model.floor_normal, dtype=dtype)
        below = (nodes @ n < model.floor_height + 0.5 * g.dx) & filled  # the node row nearest the plane and below
        vn = vg @ n
        vt = vg - vn[:, None] * n
        slide = (vt**2).sum(1)
        stop = model.friction * vn
        hit = below & (vn < 0)
        scaled = vt * (1 + stop / torch.sqrt(torch.where(slide > 0, slide, torch.ones_like(slide))))[:, None]
        contact = torch.where((slide <= stop**2)[:, None], torch.zeros_like(vg), scaled)
        vg = torch.where(hit[:, None], contact, vg)
    for a in range(3):
        # the node on each face of the particles' box (index band, shape - band) and every node outside it
        vg = _apply_wall(vg, a, model.walls_min[a], -1.0, filled & (index[:, a] <= g.boundary_cells))
        vg = _apply_wall(vg, a, model.walls_max[a], 1.0, filled & (index[:, a] >= g.shape[a] - g.boundary_cells))
    # G2P
    v_new = (w[:, :, None] * vg[None]).sum(1)
    C_new = inv_d * torch.einsum("pg,pgi,pgj->pij", w, vg.expand(len(x), -1, -1), dpos)
    F_trial = (eye + dt * C_new) @ Ft
    F_new = per_model(models, codes, lambda m, _, F_, mu_, lam_, k_: return_mapping_ref(F_, mu_, lam_, k_, m, dt=dt),
                      len(x), F_trial, mu, lam, kappa)
    if "snow" in models:  # what the clamp took from F_E goes to F_P (snow particles only)
        snowy = torch.ones(len(x), dtype=torch.bool) if codes is None else codes == models.index("snow")
        Jp = torch.where(snowy, Jp * torch.linalg.det(F_trial) / torch.linalg.det(F_new), Jp)
    if model.f_blend < 1.0:
        F_new = model.f_blend * F_new + (1 - model.f_blend) * eye
    if model.min_J > 0:
        J = torch.linalg.det(F_new)
        low = (J > 0) & (J < model.min_J)
        scale = torch.where(low, (model.min_J / torch.where(low, J, torch.ones_like(J))) ** (1 / 3), torch.ones_like(J))
        F_new = F_new * scale[:, None, None]
    lo, hi = (torch.as_tensor(b, dtype=dtype) for b in (g.interior_lower, g.interior_upper))
    x_new = torch.minimum(torch.maximum(x + dt * v_new, lo), hi)
    return {"x": x_new, "v": v_new, "F": F_new, "C": C_new, "Jp": Jp}


def rollout_ref(state: dict, *, model, steps: int, mass, volume, mu, lam, Fc=None, node_mass_eps: float,
                frames=(), kappa=None, codes=None) -> list[dict]:
    """Run ``steps`` steps of ``step_ref``; states at sorted({*frames, steps})."""
    out = []
    wanted = sorted({*frames, steps})
    if 0 in wanted:
        out.append(state)
    for t in range(steps):
        k = model.control_index(t) if Fc is not None else -1
        state = step_ref(state, model=model, mass=mass, volume=volume, mu=mu, lam=lam,
                         Fc_t=Fc[k] if k >= 0 else None, node_mass_eps=node_mass_eps, kappa=kappa, codes=codes)
        if t + 1 in wanted:
            out.append(state)
    return out
