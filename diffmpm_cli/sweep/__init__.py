"""`diffmpm sweep`: many optimisations of a scene, each an ordinary run folder, run by Ray Tune on a local Ray or a
running cluster (the optional extra ``diffmpm[sweep]``): spec.py reads the sweep file, trials.py expands and names
the trials, worker.py runs one inside a Ray worker, engine.py drives Tune, report.py writes what a sweep reports."""

from .engine import SweepResult, prepare, require_ray, run_sweep
from .spec import SweepSpec, load_sweep

__all__ = ["SweepResult", "SweepSpec", "load_sweep", "prepare", "require_ray", "run_sweep"]
