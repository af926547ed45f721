"""Constitutive models of the MLS-MPM step (kernels/mpm.py builds its kernels per model from ``MATERIALS``).

Per model: the Kirchhoff stress tau(F, C; mu, lam, kappa) that P2G scatters, the return mapping Z that G2P applies
to F+ = (I + dt C) F~ (the identity for elastic models), and the function deciding Z's branch (recorded per particle
and replayed in the backward, sim/solver.py). The kernels pass each particle's model parameters as one vec3
(sim/op.py material_kappa); the scalar models' functions (``MATERIALS``) take its first component as ``kappa``;
snow's, Bingham's and Drucker-Prager's (its cohesive apex: k[1]) take the vector (``KERNEL_MODELS`` holds every
model in the kernels' signature). Hand-written adjoints (``wp.func_grad``) where Warp's generated ones fail: the
polar rotation and the spectral maps, whose wp.svd3 adjoint divides by s_i^2 - s_j^2. The models live in
kernels/elastic.py (fixed-corotated, neo-Hookean, the polar rotation), kernels/plastic.py (the spectral maps on
Hencky strain: von Mises, Drucker-Prager) and kernels/viscoplastic.py (snow, Bingham, Herschel-Bulkley); this module
holds the fluid, the per-model tables and the dispatch over a scene's models.
"""

import warp as wp

from ..enums import Material
from .elastic import POLAR_EPS, fixed_corotated_tau, neo_hookean_tau, polar_rotation  # noqa: F401 (re-exported)
from .plastic import (  # noqa: F401 (re-exported: tests and kernels/mpm.py read them here)
    ELASTIC,
    TENSION,
    YIELD,
    drucker_prager_branch,
    drucker_prager_branch_k,
    drucker_prager_F,
    drucker_prager_F_k,
    hencky_P,
    spectral_adjoint,
    von_mises_branch,
    von_mises_F,
)
from .viscoplastic import (  # noqa: F401 (re-exported)
    SNOW_GAP,
    bingham_branch,
    bingham_F,
    bingham_hb_F,
    bingham_stress,
    herschel_bulkley_F,
    herschel_bulkley_rho,
    snow_branch,
    snow_F,
    snow_stress,
)


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
    **{material: _vector_model(*funcs) for material, funcs in MATERIALS.items() if material != Material.DRUCKER_PRAGER},
    # k = (alpha, a = c cot phi [Pa], -): the cohesive apex (kernels/plastic.py; MATERIALS' scalar form has a = 0)
    Material.DRUCKER_PRAGER: (_vector_model(*MATERIALS[Material.DRUCKER_PRAGER])[0], drucker_prager_F_k,
                              drucker_prager_branch_k),
    Material.SNOW: (snow_stress, snow_F, snow_branch),
    Material.BINGHAM: (bingham_stress, bingham_hb_F, bingham_branch),
}


# ----------------------------------------------------------------------------------------------------------------
# several models in one scene: each particle's model code (its model's index in the scene's tuple of models) picks
# its stress, return mapping and branch. Built per tuple by static closures: a one-model tuple calls that model's
# functions with no branch on the code (today's kernels); with several, an if-chain over the tuple, each arm one
# model's function (only the particle's own arm runs, forward and adjoint).


def _chain(models: tuple, slot: int, make_one, make_pair):
    """The function for ``models[slot:]`` dispatched on the code: one model's, or an if-chain of them."""
    if slot == len(models) - 1:
        return make_one(models[slot])
    return make_pair(models[slot], slot, _chain(models, slot + 1, make_one, make_pair))


def _stress_one(material):
    stress = KERNEL_MODELS[material][0]

    @wp.func
    def stress_c(code: int, F: wp.mat33, C: wp.mat33, mu: float, lam: float, k: wp.vec3, Jp: float):
        return stress(F, C, mu, lam, k, Jp)

    return stress_c


def _stress_pair(material, slot: int, rest):
    stress = KERNEL_MODELS[material][0]

    @wp.func
    def stress_c(code: int, F: wp.mat33, C: wp.mat33, mu: float, lam: float, k: wp.vec3, Jp: float):
        out = wp.mat33(0.0)
        if code == wp.static(slot):
            out = stress(F, C, mu, lam, k, Jp)
        else:
            out = rest(code, F, C, mu, lam, k, Jp)
        return out

    return stress_c


def _mapping_one(material):
    mapping = KERNEL_MODELS[material][1]

    @wp.func
    def mapping_c(code: int, F: wp.mat33, mu: float, lam: float, k: wp.vec3, dt: float, branch: int):
        return mapping(F, mu, lam, k, dt, branch)

    return mapping_c


def _mapping_pair(material, slot: int, rest):
    mapping = KERNEL_MODELS[material][1]

    @wp.func
    def mapping_c(code: int, F: wp.mat33, mu: float, lam: float, k: wp.vec3, dt: float, branch: int):
        out = F
        if code == wp.static(slot):
            out = mapping(F, mu, lam, k, dt, branch)
        else:
            out = rest(code, F, mu, lam, k, dt, branch)
        return out

    return mapping_c


def _branch_one(material):
    branch_of = KERNEL_MODELS[material][2]

    @wp.func
    def branch_c(code: int, F: wp.mat33, mu: float, lam: float, k: wp.vec3):
        return branch_of(F, mu, lam, k)

    return branch_c


def _branch_pair(material, slot: int, rest):
    branch_of = KERNEL_MODELS[material][2]

    @wp.func
    def branch_c(code: int, F: wp.mat33, mu: float, lam: float, k: wp.vec3):
        out = int(0)
        if code == wp.static(slot):
            out = branch_of(F, mu, lam, k)
        else:
            out = rest(code, F, mu, lam, k)
        return out

    return branch_c


_DISPATCH = {}


def model_dispatch(models: tuple):
    """(stress(code, F, C, mu, lam, k, J_P), mapping(code, F, mu, lam, k, dt, branch), branch(code, F, mu, lam, k))
    over the scene's ``models`` (Material members, code i = models[i]); built once per tuple."""
    models = tuple(Material(m) for m in models)
    if models not in _DISPATCH:
        _DISPATCH[models] = (_chain(models, 0, _stress_one, _stress_pair),
                             _chain(models, 0, _mapping_one, _mapping_pair),
                             _chain(models, 0, _branch_one, _branch_pair))
    return _DISPATCH[models]


def snow_code(models: tuple) -> int:
    """The code of snow (the one model that reads and updates J_P) among ``models``, or -1."""
    models = tuple(Material(m) for m in models)
    return models.index(Material.SNOW) if Material.SNOW in models else -1
