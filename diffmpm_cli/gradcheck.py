"""Autodiff vs central finite differences along random directions (the routine behind tests and `check-grad`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Probe:
    """One directional derivative: autodiff grad . u against (L(theta + eps u) - L(theta - eps u)) / (2 eps)."""

    parameter: str
    direction: str  # "random" or "coordinate <i>"
    ad: float
    fd: float
    eps: float

    @property
    def rel_error(self) -> float:
        scale = max(abs(self.ad), abs(self.fd), 1e-12)
        return abs(self.ad - self.fd) / scale


def directional_probes(loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], params: dict[str, torch.Tensor], *,
                       eps: dict[str, float], probes: int = 3, coordinates: int = 0, seed: int = 0) -> list[Probe]:
    """Compare d loss / d param along ``probes`` random unit directions (and ``coordinates`` single entries).

    ``loss_fn`` maps a dict of parameter tensors to a scalar. It is evaluated once with autograd and twice per
    probe without; ``eps[name]`` is the step along the unit direction.
    """
    generator = torch.Generator().manual_seed(seed)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss = loss_fn(leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    results = []
    for (name, value), grad in zip(leaves.items(), grads, strict=True):
        grad = torch.zeros_like(value) if grad is None else grad
        directions = []
        for _ in range(probes):
            u = torch.randn(value.shape, generator=generator, dtype=value.dtype)
            directions.append(("random", u / u.norm()))
        for _ in range(coordinates):
            i = int(torch.randint(value.numel(), (1,), generator=generator))
            u = torch.zeros(value.numel(), dtype=value.dtype)
            u[i] = 1.0
            directions.append((f"coordinate {i}", u.reshape(value.shape)))
        for label, u in directions:
            u = u.to(value.device)
            h = eps[name]
            with torch.no_grad():
                plus = float(loss_fn({**leaves, name: value.detach() + h * u}))
                minus = float(loss_fn({**leaves, name: value.detach() - h * u}))
            results.append(Probe(parameter=name, direction=label, ad=float((grad * u).sum()),
                                 fd=(plus - minus) / (2 * h), eps=h))
    return results
