"""Checkpoints: parameters, optimiser and schedule state, RNG states and the iteration, written atomically.

``checkpoints/iter_000010.pt`` ... (the latest ``keep`` of them) and ``checkpoints/best.pt`` (parameters only).
A file is written to a temporary name in the same folder and renamed into place, so a run killed at any moment
leaves either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

PATTERN = "iter_{:06d}.pt"


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _cpu(tensors: dict | None) -> dict | None:
    return None if tensors is None else {k: v.detach().cpu().clone() for k, v in tensors.items()}


def start_state(checkpoint: dict, device) -> dict | None:
    """The episode's starting state (x, v, F, C) a checkpoint carries, on ``device``; None: the rest state."""
    start = checkpoint.get("start")
    return None if start is None else {k: v.to(device) for k, v in start.items()}


def save_checkpoint(folder: Path, *, iteration: int, params: dict, optimizer, scheduler, best_loss: float,
                    keep: int, start: dict | None = None) -> Path:
    """Write the state after ``iteration`` completed iterations (and the episode's ``start``); prune to the latest
    ``keep``."""
    state = {
        "iteration": iteration,
        "params": _cpu(params),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "best_loss": best_loss,
        "start": _cpu(start),
    }
    folder = Path(folder)
    path = folder / PATTERN.format(iteration)
    _atomic_save(state, path)
    for old in sorted(folder.glob("iter_*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def save_best(folder: Path, *, iteration: int, params: dict, loss: float, start: dict | None = None) -> Path:
    """best.pt: the parameters that gave the lowest loss so far (evaluated at ``iteration``) and the episode's
    starting state (None: the rest state)."""
    path = Path(folder) / "best.pt"
    _atomic_save({"iteration": iteration, "loss": loss, "params": _cpu(params), "start": _cpu(start)}, path)
    return path


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(Path(folder).glob("iter_*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)
