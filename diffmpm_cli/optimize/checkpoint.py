"""Checkpoints: parameters, optimiser and schedule state, RNG states and the iteration, written atomically.

``checkpoints/iter_000010.pt`` ... (the latest ``keep`` of them) and ``checkpoints/best.pt`` (parameters only).
A file is written to a temporary name in the same folder and renamed into place, so a run killed at any moment
leaves either the old or the new checkpoint, never a torn one. ``checkpoints/written.txt`` (the ledger, also
replaced atomically) lists the checkpoints this run wrote; it is updated after a new checkpoint is in place and
before older ones are pruned, so a failed write (a full disk) never loses the last good checkpoint.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from ..outputs.files import atomic_write

PATTERN = "iter_{:06d}.pt"
LEDGER = "written.txt"  # the checkpoints this run wrote, oldest first


def _atomic_save(obj, path: Path) -> None:
    """torch.save ``obj`` (or write ``obj`` when it is bytes) durably and atomically onto ``path``."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(obj) if isinstance(obj, bytes) else torch.save(obj, f)

    atomic_write(path, write, durable=True)


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
                    keep: int, start: dict | None = None, wall_s: float = 0.0) -> Path:
    """Write the state after ``iteration`` completed iterations (and the episode's ``start``, and ``wall_s``: the
    run's time up to here over all its sessions); prune to the latest ``keep``."""
    state = {
        "iteration": iteration,
        "params": _cpu(params),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "best_loss": best_loss,
        "start": _cpu(start),
        "wall_s": float(wall_s),
    }
    folder = Path(folder)
    path = folder / PATTERN.format(iteration)
    _atomic_save(state, path)
    # prune only what this run wrote (listed in checkpoints/written.txt), never a file someone else put there;
    # the ledger is replaced before anything is deleted, so a failure in between never leaves it without a checkpoint
    mine = [name for name in _ledger(folder) or [] if name != path.name] + [path.name]
    _write_ledger(folder, mine[-keep:])
    for name in mine[:-keep]:
        (folder / name).unlink(missing_ok=True)
    return path


def _write_ledger(folder: Path, names: list[str]) -> None:
    _atomic_save("".join(name + "\n" for name in names).encode(), Path(folder) / LEDGER)


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
        with warnings.catch_warnings():  # a garbage file makes torch warn about its "pickle protocol" first
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever a torn or foreign file makes the loader raise (struct.error, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(str(path), f"not a loadable diffmpm checkpoint ({first[:200]})") from exc


_REQUIRED = {"iteration": int, "params": dict, "optimizer": dict, "scheduler": dict, "rng": dict, "best_loss": float}


def check_structure(checkpoint, path: Path) -> dict:
    """``checkpoint`` if it has the keys and types of an iteration checkpoint; CheckpointError otherwise."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(str(path), f"not a diffmpm checkpoint (holds a {type(checkpoint).__name__})")
    for key, kind in _REQUIRED.items():
        value = checkpoint.get(key)
        if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            raise CheckpointError(str(path), f"not a diffmpm checkpoint (no valid '{key}')")
    if not all(isinstance(v, torch.Tensor) for v in checkpoint["params"].values()):
        raise CheckpointError(str(path), "not a diffmpm checkpoint (its params are not all tensors)")
    return checkpoint


def shape_mismatch(checkpoint: dict, params: dict) -> str | None:
    """What differs between a checkpoint's parameters and this run's (names and shapes); None when they fit."""
    theirs = {k: tuple(v.shape) for k, v in checkpoint["params"].items()}
    ours = {k: tuple(v.shape) for k, v in params.items()}
    if set(theirs) != set(ours):
        missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        parts = ([f"this run also learns {', '.join(missing)}"] if missing else []) + \
                ([f"the checkpoint also holds {', '.join(extra)}"] if extra else [])
        return "; ".join(parts)
    for k in sorted(ours):
        if theirs[k] != ours[k]:
            return f"{k} has shape {list(theirs[k])} in the checkpoint but {list(ours[k])} in this run"
    return None


@dataclass
class ResumePoint:
    path: Path | None  # None: the run wrote no checkpoint yet (it starts from iteration 0)
    checkpoint: dict | None
    notes: list[str]  # what was passed over, and why
    unusable: list[str]  # names in the ledger that cannot be loaded (see forget_checkpoints)


def forget_checkpoints(folder: Path, names: list[str]) -> None:
    """Drop ``names`` from the ledger (the files stay; a resumed run replaces them when it gets there)."""
    mine = _ledger(folder)
    if mine is not None and names:
        _write_ledger(folder, [n for n in mine if n not in names])


def resume_checkpoint(folder: Path, params: dict) -> ResumePoint:
    """The newest intact checkpoint this run wrote that fits ``params`` (names and shapes), with notes on every newer
    one passed over (truncated, garbage, empty, not a checkpoint, or of other shapes). Reads only. CheckpointError
    (exit 2) when there are checkpoints but none can be used: a checkpoint of another scene, or a ``--set`` that
    changes what is learned or its shapes."""
    folder = Path(folder)
    mine = _ledger(folder)
    names = sorted(p.name for p in folder.glob("iter_*.pt")) if mine is None else mine
    notes, mismatches, broken = [], [], []
    for name in reversed(names):
        path = folder / name
        if not path.exists():
            continue
        try:
            ckpt = check_structure(load_checkpoint(path), path)
        except CheckpointError as exc:
            broken.append(name)
            notes.append(f"{exc}: skipped")
            continue
        problem = shape_mismatch(ckpt, params)
        if problem is not None:
            mismatches.append(f"{path}: {problem}")
            notes.append(f"{path}: does not fit this run ({problem}): skipped")
            continue
        if notes:
            notes.append(f"resuming from {path} (iteration {ckpt['iteration']})")
        return ResumePoint(path, ckpt, notes, broken if mine is not None else [])
    if mismatches:
        raise CheckpointError(mismatches[0].split(": ", 1)[0], "does not fit this run: " + mismatches[0].split(": ", 1)[1]
                              + " (a checkpoint of another scene, or a --set that changes what is learned or its "
                              "shapes; start a new run instead)")
    if broken:
        raise CheckpointError(str(folder), "no intact checkpoint to resume from (" + "; ".join(notes) + ")")
    return ResumePoint(None, None, notes, [])
