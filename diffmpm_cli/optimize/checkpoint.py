"""Checkpoints: parameters, optimiser and schedule state, RNG states and the iteration, written atomically.

``checkpoints/iter_000010.pt`` ... (the latest ``keep`` of them) and ``checkpoints/best.pt`` (parameters only).
A file is written to a temporary name in the same folder and renamed into place, so a run killed at any moment
leaves either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

PATTERN = "iter_{:06d}.pt"
LEDGER = "written.txt"  # the checkpoints this run wrote, oldest first


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
    """The torch, numpy and Python RNG states as tensors, numbers and lists only (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))


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
    # prune only what this run wrote (listed in checkpoints/written.txt), never a file someone else put there
    mine = [name for name in _ledger(folder) or [] if name != path.name] + [path.name]
    for name in mine[:-keep]:
        (folder / name).unlink(missing_ok=True)
    (folder / LEDGER).write_text("".join(name + "\n" for name in mine[-keep:]))
    return path


def _ledger(folder: Path) -> list[str] | None:
    """The checkpoint names this run wrote, oldest first; None when the folder has no ledger."""
    ledger = Path(folder) / LEDGER
    return [line for line in ledger.read_text().splitlines() if line] if ledger.exists() else None


def save_best(folder: Path, *, iteration: int, params: dict, loss: float, start: dict | None = None) -> Path:
    """best.pt: the parameters that gave the lowest loss so far (evaluated at ``iteration``) and the episode's
    starting state (None: the rest state)."""
    path = Path(folder) / "best.pt"
    _atomic_save({"iteration": iteration, "loss": loss, "params": _cpu(params), "start": _cpu(start)}, path)
    return path


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the half-written temporaries (.<name>.pt.*.tmp) a killed run left behind."""
    for path in Path(folder).glob(".*.pt.*.tmp"):
        path.unlink(missing_ok=True)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint this run wrote (its ledger), or None. A folder without a ledger (written before
    there was one) counts every iter_*.pt as its own."""
    mine = _ledger(folder)
    if mine is None:
        found = sorted(Path(folder).glob("iter_*.pt"))
    else:
        found = [Path(folder) / name for name in mine if (Path(folder) / name).exists()]
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents. Loaded with ``weights_only=True``: tensors, numbers, strings and containers only, so
    a file with any other pickled object (which could run code) is refused with a CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(str(path), f"not a loadable diffmpm checkpoint ({first[:200]})") from exc
