"""A sweep's trials: expanded from the sweep file by Ray Tune's variant generator, named by their parameters, each
an ordinary run folder under the sweep's folder; what each folder holds already (new, unfinished, finished).

Nothing here starts Ray; ``expand`` imports ``ray.tune`` for its search-space sampling only.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import load_scene
from ..errors import ConfigError, DiffMPMError
from ..losses import LOSS_TERMS
from ..optimize.runfolder import CONFIG, config_difference, holds_run
from .spec import SweepSpec

MAX_NAME = 100  # characters of a trial folder's name; longer names end in a hash of the parameters
SCENE_KEY = "scene"  # the varied "key" when a sweep has several scenes

# metrics every run reports (metrics.jsonl each iteration, summary.json's "final")
ALWAYS = ("loss", "silhouette_iou_mean", "psnr_mean", "inverted_share", "det_F_min", "det_F_median", "clumped_share",
          "max_per_cell", "inverted_share_any_step", "det_F_min_any_step", "physically_valid")
WITH_MESH = ("chamfer", "volume_iou")  # with a target mesh
FINAL_WITH_MESH = ("exact_iou_mean", "exact_iou_unseen_mean", "exact_missed_share", "exact_extra_share",
                   "chamfer_exact")  # with a target mesh, at the end of a run only


def metric_names(scene, *, final: bool = True) -> list[str]:
    """The numeric metrics a run of ``scene`` reports: in summary.json's "final" (``final``) or in every line of
    metrics.jsonl (the ones early stopping can use)."""
    names = [*ALWAYS, *(t for t in LOSS_TERMS if getattr(scene.loss, t, 0))]
    if scene.target.mesh is not None:
        names += [*WITH_MESH, *(FINAL_WITH_MESH if final else ())]
    truth = scene.target.truth
    if truth is not None:  # E and nu as means over the particles, unless material.regions give parts their own
        mixed = scene.material.keys_set_by_regions(("E", "nu"))
        names += [k for k in ("E", "nu") if k not in mixed]
        names += [e for k, e, t in (("E", "E_rel_error", truth.E), ("nu", "nu_abs_error", truth.nu))
                  if t is not None and k not in mixed]
    return names


def main_metric_name(scene) -> str:
    """What `diffmpm optimize` calls the main metric (optimize/evaluate.py's main_metric): the error of E when
    the truth is known, else the silhouette IoU."""
    truth = scene.target.truth
    return "E_rel_error" if truth is not None and truth.E is not None else "silhouette_iou_mean"


@dataclass
class Trial:
    """One point of the sweep: a scene with overrides, run in its own run folder."""

    name: str
    scene_path: Path
    params: dict[str, Any]  # varied key -> value (SCENE_KEY -> the scene's stem with several scenes)
    overrides: list[str]  # --set KEY=VALUE items: the sweep's fixed ones, then the varied ones
    run_dir: Path
    scene: Any = None  # the loaded Scene; None when the parameters are refused
    error: str | None = None  # why the parameters are refused (the trial is recorded as failed, never run)
    state: str = "new"  # new | unfinished | finished | failed (a run that failed before) | stopped (early)
    record: dict = field(default_factory=dict)  # what the sweep reports about it (see report.py)


def yaml_value(value: Any) -> str:
    """A value as YAML text for a KEY=VALUE override (JSON is YAML 1.2 flow)."""
    return json.dumps(value)


def value_label(value: Any) -> str:
    """A value as it appears in a folder name and the table: 6 significant digits for floats."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ",".join(value_label(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}:{value_label(v)}" for k, v in value.items())
    return str(value)


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each key's shortest dotted tail of at least two parts that no other key ends with: learn.E.init,
    loss.volume -> E.init, loss.volume."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(min(2, len(parts)), len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(other != key and (other == tail or other.endswith("." + tail)) for other in keys):
                out[key] = tail
                break
        else:
            out[key] = key
    return out


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._,=+-]+", "_", text)


def trial_names(points: list[dict[str, Any]], keys: list[str], *, samples: int) -> list[str]:
    """Deterministic folder names: ``E.init=30000__loss.volume=0.02`` (short keys, values at 6 digits), sanitised to
    letters, digits and ``._,=+-``, never hidden; ``__sample=K`` with several draws per grid point; at most MAX_NAME
    characters (longer ones end in a hash of the exact parameters); names that would collide get that hash too."""
    short = short_keys(keys)

    def digest(point: dict) -> str:
        return hashlib.sha1(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:10]

    names = []
    for point in points:
        pieces = [_safe(Path(point[SCENE_KEY]).stem)] if SCENE_KEY in point else []
        pieces += [f"{_safe(short[k])}={_safe(value_label(point[k]))}" for k in keys if k != SCENE_KEY]
        if samples > 1:
            pieces.append(f"sample={point['__sample']}")
        name = "__".join(pieces).lstrip(".") or "trial"
        if len(name) > MAX_NAME:
            name = f"{name[:MAX_NAME - 12]}-{digest(point)}"
        names.append(name)
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    return [f"{name[:MAX_NAME - 12]}-{digest(point)}" if seen[name] > 1 else name for name, point in zip(names, points)]


def _search_space(spec: SweepSpec, scenes: list[Path]) -> dict:
    from ray import tune

    space: dict[str, Any] = {}
    if len(scenes) > 1:
        space[SCENE_KEY] = tune.grid_search([str(s) for s in scenes])
    for key, dist in spec.params.items():
        kind, args = dist.kind, dist.args
        space[key] = (tune.grid_search(list(args)) if kind == "grid" else tune.choice(list(args)) if kind == "choice"
                      else tune.uniform(*args) if kind == "uniform" else tune.loguniform(*args)
                      if kind == "loguniform" else tune.randint(*args))
    return space


def expand(spec: SweepSpec, *, scenes: list[Path], out: Path) -> list[Trial]:
    """Every trial of the sweep, in a fixed order: the grid (Tune's order) times ``samples`` draws of the
    distributions from ``seed``. A trial's scene is loaded with its overrides here; a refused value makes that
    trial a failed one (``error``), an unknown key refuses the whole sweep (ConfigError, exit 2)."""
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    space = _search_space(spec, scenes)
    rng = np.random.default_rng(spec.seed)
    points: list[dict] = []
    for sample in range(spec.samples):
        for _, resolved in generate_variants(space, random_state=rng):
            point = {k: _plain(resolved[k]) for k in space}
            point["__sample"] = sample
            points.append(point)
    keys = list(space)
    names = trial_names(points, keys, samples=spec.samples)
    fixed = [f"{k}={yaml_value(v)}" for k, v in spec.set.items()]
    if spec.iterations is not None:
        fixed.append(f"optimize.iterations={spec.iterations}")
    trials = []
    for name, point in zip(names, points):
        scene_path = Path(point[SCENE_KEY]) if SCENE_KEY in point else scenes[0]
        params = {k: (Path(v).stem if k == SCENE_KEY else v) for k, v in point.items() if k != "__sample"}
        varied = [f"{k}={yaml_value(v)}" for k, v in point.items() if k not in (SCENE_KEY, "__sample")]
        trial = Trial(name=name, scene_path=scene_path, params=params, overrides=[*fixed, *varied],
                      run_dir=Path(out) / name)
        try:
            trial.scene = load_scene(scene_path, trial.overrides)
        except ConfigError as exc:
            _refuse_structural(exc, spec, trial)
            trial.error, trial.state = str(exc).replace("\n", "; "), "failed"
        trials.append(trial)
    return trials


def _plain(value: Any) -> Any:
    """numpy scalars (Tune's draws) as Python numbers."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    return value


def _refuse_structural(exc: ConfigError, spec: SweepSpec, trial: Trial) -> None:
    """An unknown key, an unparsable override or a missing scene file is the sweep's mistake, not one trial's:
    refuse the sweep. A value out of range (nu = 0.6) stays this trial's failure."""
    for path, message in exc.issues:
        origin = next((k for k in [*spec.params, *spec.set] if path == k or path.startswith(k + ".")
                       or path == f"--set {k}"), None)
        if message.startswith("unknown key") or path.startswith("--set ") or not path:
            where = (f"params.{origin}" if origin in spec.params else f"set.{origin}" if origin else
                     path or f"scene {trial.scene_path}")
            raise ConfigError(where, f"{message} (in {trial.scene_path.name}: {path})" if path and origin is None
                              else message)


def check_metric(spec: SweepSpec, trials: list[Trial]) -> tuple[str, str]:
    """(metric, mode): the sweep's metric, known to every scene of the sweep (ConfigError naming ``metric``
    otherwise); by default the scenes' main metric."""
    loaded = [t for t in trials if t.scene is not None]
    if not loaded:
        return spec.metric or "loss", spec.resolved_mode(spec.metric or "loss")
    metric = spec.metric
    if metric is None:
        mains = sorted({main_metric_name(t.scene) for t in loaded})
        if len(mains) > 1:
            raise ConfigError("metric", f"the scenes' main metrics differ ({', '.join(mains)}): name one")
        metric = mains[0]
    for trial in loaded:
        known = metric_names(trial.scene)
        if metric not in known:
            raise ConfigError("metric", f"'{metric}' is not a metric of a run of {trial.scene_path.name}; it reports: "
                                        + ", ".join(known))
    if spec.early_stop is not None:
        name = spec.early_stop.metric or metric
        for trial in loaded:
            known = metric_names(trial.scene, final=False)
            if name not in known:
                raise ConfigError("early_stop.metric", f"'{name}' is not in every line of metrics.jsonl of "
                                                       f"{trial.scene_path.name} (final-only metrics cannot stop "
                                                       "early); one of: " + ", ".join(known))
    return metric, spec.resolved_mode(metric)


def read_summary(run_dir: Path) -> dict | None:
    """summary.json of a run folder, or None (absent or unreadable: the run did not finish)."""
    path = Path(run_dir) / "summary.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def inspect_folders(trials: list[Trial], *, stopped: set[str] = frozenset()) -> None:
    """Set each trial's state from its run folder: new (absent or empty), unfinished (a run without a final
    summary, or with fewer iterations than now asked for), finished, failed (a run that failed before: rerunning
    it would fail the same way) or stopped (early stopping stopped it in an earlier session: in ``stopped``).
    ConfigError (exit 2, nothing written) for a folder that holds something else or a run of another
    configuration: the sweep never writes into it."""
    for trial in trials:
        path = trial.run_dir
        if trial.error is not None:
            continue
        if path.exists() and not path.is_dir():
            raise ConfigError(f"trial {trial.name}", f"{path} is not a folder")
        if not path.exists() or not any(path.iterdir()):
            trial.state = "new"
            continue
        if not holds_run(path):
            raise ConfigError(f"trial {trial.name}", f"{path} is not empty and holds no diffmpm run: move it away or "
                                                     "choose another --out")
        try:
            saved = load_scene(path / CONFIG)
        except DiffMPMError as exc:
            raise ConfigError(f"trial {trial.name}", f"{path / CONFIG} cannot be read ({exc}): move the folder away "
                                                     "to run this trial again") from None
        found = config_difference(saved, trial.scene, ignore={"optimize.iterations"})
        if found is not None:
            key, before, after = found
            raise ConfigError(f"trial {trial.name}", f"{path} holds a run of another configuration ({key}: {before} "
                                                     f"there, {after} now); move it away or choose another --out")
        summary = read_summary(path)
        planned = trial.scene.optimize.iterations * trial.scene.optimize.episodes
        if summary is not None and summary.get("failed"):
            trial.state, trial.error = "failed", str(summary["failed"])
        elif summary is not None and summary.get("iterations", -1) >= planned:
            trial.state = "finished"
        elif trial.name in stopped:
            trial.state = "stopped"
        else:
            trial.state = "unfinished"
        if summary is not None and summary.get("iterations", -1) > planned and not summary.get("failed"):
            raise ConfigError(f"trial {trial.name}", f"{path} has run {summary['iterations']} iterations, more than "
                                                     f"the {planned} asked for; choose another --out")


def finite_or_none(value: Any) -> float | None:
    """A metric value as a float for sorting and CSV (booleans as 0/1); None when missing or not finite."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None
