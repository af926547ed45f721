"""Closed sets shared by the scene schema, the host code and the Warp kernels (pure Python, imports nothing).

Host code passes these members around; they become ints only at the kernel boundary (``code``), where
``kernels/mpm.py`` turns the same codes into ``wp.constant``s. The string values are the scene file's spellings.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class _Coded(StrEnum):
    @property
    def code(self) -> int:
        """The member's int at the kernel boundary: its position in the definition."""
        return list(type(self)).index(self)


class WallKind(_Coded):
    """Wall condition of a domain face (``sim.boundaries``)."""

    STICKY = "sticky"  # v = 0
    SLIP = "slip"  # normal v = 0
    SEPARATE = "separate"  # outward normal v = 0


class BSpline(StrEnum):
    """Transfer kernel (``sim.bspline``): quadratic (27 nodes) or cubic (64 nodes)."""

    QUADRATIC = "quadratic"
    CUBIC = "cubic"


class Material(StrEnum):
    """Constitutive model (``material.model``)."""

    FIXED_COROTATED = "fixed_corotated"
    NEO_HOOKEAN = "neo_hookean"
    VON_MISES = "von_mises"  # plasticine / metal: Hencky (StVK log-strain) elasticity, von Mises return mapping
    DRUCKER_PRAGER = "drucker_prager"  # sand: Hencky elasticity, Drucker-Prager return mapping (Klar et al. 2016)
    NEWTONIAN_FLUID = "newtonian_fluid"  # weakly compressible fluid: J-based pressure, Newtonian viscosity
    SNOW = "snow"  # Stomakhin et al. 2013: fixed-corotated F_E, singular values clamped, J_P hardening
    BINGHAM = "bingham"  # viscoplastic (Bingham): Hencky elasticity, von Mises yield with viscous (Perzyna) flow

    @property
    def parameters(self) -> tuple[str, ...]:
        """The model's material parameters beside E and nu (material.<name>), in the order of the kernels'
        per-particle parameter vector (sim/op.py material_kappa); () for the elastic models."""
        return MODEL_PARAMETERS.get(self.value, ())

    @property
    def learnable_parameters(self) -> tuple[str, ...]:
        """Those of ``parameters`` that are learnable (learn.<key>, target.truth.<key>); snow's critical
        compression and stretch and bingham's flow index are scene constants."""
        return tuple(name for name in self.parameters if name in LEARNABLE_MODEL_PARAMETERS)

    @property
    def extra_parameter(self) -> str | None:
        """The model's first learnable parameter beside E and nu, or None for the elastic models."""
        learnable = self.learnable_parameters
        return learnable[0] if learnable else None


# per model: its parameters beside E and nu, in the order of the kernels' parameter vector (kappa[0], [1], [2])
MODEL_PARAMETERS = {
    "von_mises": ("yield_stress",),
    "drucker_prager": ("friction_angle", "cohesion"),  # cohesion c [Pa]: the kernels get a = c cot(phi) (kappa[1])
    "newtonian_fluid": ("viscosity",),
    "snow": ("hardening", "critical_compression", "critical_stretch"),
    "bingham": ("yield_stress", "viscosity", "flow_index"),  # viscosity: the consistency K [Pa s^N] when N != 1
}
LEARNABLE_MODEL_PARAMETERS = ("yield_stress", "friction_angle", "cohesion", "viscosity", "hardening")


class P2GMode(StrEnum):
    """How untaped forward steps scatter particles to the grid: ``plain`` (one thread per particle, global atomics;
    the only mode of differentiable rollouts) or ``tiled`` (a shared-memory reduction per block; a CUDA speed path
    that ``diffmpm bench`` measures)."""

    PLAIN = "plain"
    TILED = "tiled"


class DecisionMode(IntEnum):
    """What a step does with its branch decisions (the grid update's per node: contact, friction, walls, empty nodes;
    G2P's per particle: the return mapping's branch)."""

    DECIDE = 0  # decide, keep nothing
    RECORD = 1  # decide and write them (and, where a record of F_trial is passed, snow's F_trial per particle)
    REPLAY = 2  # take the written ones
    # take the written ones, and replace snow's return mapping by its linearisation at the recorded F_trial*:
    # G(F*) + dG(F*)[F_trial - F*], J_P's update likewise (check-grad's probes; the grid update replays)
    LINEARISE = 3
