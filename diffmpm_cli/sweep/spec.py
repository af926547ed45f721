"""The sweep file (``diffmpm sweep SWEEP.yaml``) and the command line's shortcuts for it.

A sweep file is one YAML mapping, read with the scene loader's YAML rules (1.2 core schema, bounded, no duplicate
keys) and checked with the scene's strictness (unknown keys are errors with a "did you mean")::

    name: drop-E                    # default: the file's stem
    scene: elastic_drop.yaml        # a scene file (relative to this file) or a shipped scene's name; or a list
    set: {optimize.iterations: 20}  # overrides for every trial, as --set KEY=VALUE
    params:                         # the keys to vary: a list is a grid, a mapping a distribution
      learn.E.init: [1.0e4, 3.0e4, 1.0e5]
      learn.nu.init: {uniform: [0.2, 0.45]}
    samples: 1                      # draws of the distributions per grid point (Ray Tune's num_samples)
    seed: 0                         # of the draws: the same seed draws the same trials, so a rerun resumes them
    metric: E_rel_error             # a final metric of the runs (default: the scenes' main metric)
    mode: min                       # default: max for IoU/PSNR metrics, min otherwise
    resources: {cpus: 1, gpus: auto}
    early_stop: {grace: 5, reduction: 2}   # ASHA on the per-iteration metric

Nothing here imports Ray: a sweep file is checked (and refused with exit 2) whether or not Ray is installed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..config.load import _config_error, parse_yaml, read_yaml, yaml_problem
from ..config.schema import Section
from ..errors import ConfigError

MAX_SWEEP_BYTES = 1 << 20
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
# metrics where more is better (the default mode); everything else (losses, errors, distances) is minimised
MAXIMISED = ("iou", "psnr", "physically_valid")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be finite, got {value}")
    return value


class Distribution(Section):
    """One varied key: exactly one of grid (every value), choice (one at random per draw), uniform / loguniform
    [low, high] (floats), randint [low, high) (integers)."""

    grid: list[Annotated[Any, BeforeValidator(_finite)]] | None = Field(None, min_length=1)
    choice: list[Annotated[Any, BeforeValidator(_finite)]] | None = Field(None, min_length=1)
    uniform: Annotated[list[float], Field(min_length=2, max_length=2)] | None = None
    loguniform: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=2, max_length=2)] | None = None
    randint: Annotated[list[int], Field(min_length=2, max_length=2)] | None = None

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in DISTRIBUTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)}" + (f" (got {', '.join(given)})"
                                                                                  if given else ""))
        low_high = self.uniform or self.loguniform or self.randint
        if low_high is not None and not low_high[0] < low_high[1]:
            raise ValueError(f"{given[0]}: low must be below high, got {low_high}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    @property
    def args(self) -> list:
        return getattr(self, self.kind)


def _as_distribution(value: Any) -> Any:
    """A plain list is a grid."""
    return {"grid": value} if isinstance(value, list) else value


def _auto(value: Any) -> Any:
    return None if value == "auto" else value


class Resources(Section):
    """What one trial reserves on the Ray cluster."""

    cpus: Annotated[float, Field(gt=0)] = Field(1.0, description="CPU cores per trial")
    gpus: Annotated[Annotated[float, Field(ge=0)] | None, BeforeValidator(_auto)] = Field(
        None, description="GPUs per trial (a fraction shares one); auto (or null): 1 when the cluster has GPUs, else 0")


class EarlyStop(Section):
    """ASHA (asynchronous successive halving, Ray Tune's AsyncHyperBandScheduler) on a per-iteration metric."""

    metric: str | None = Field(None, description="a metric of metrics.jsonl (default: the sweep's metric)")
    grace: Annotated[int, Field(ge=1)] = Field(1, description="iterations every trial runs before it may stop")
    reduction: Annotated[float, Field(gt=1)] = Field(2.0, description="1/reduction of the trials go on at each rung")


class SweepSpec(Section):
    """A whole sweep: base scene(s), varied keys, metric, resources."""

    name: str | None = Field(None, description="the sweep's name (default: the file's stem)")
    scene: str | Annotated[list[str], Field(min_length=1)] = Field(
        description="scene file(s), relative to the sweep file, or shipped scene names")
    set: dict[str, Annotated[Any, BeforeValidator(_finite)]] = Field(
        default_factory=dict, description="overrides for every trial (KEY: VALUE, as --set KEY=VALUE)")
    params: dict[str, Annotated[Distribution, BeforeValidator(_as_distribution)]] = Field(
        default_factory=dict, description="the keys to vary: a list (grid) or a distribution")
    samples: Annotated[int, Field(ge=1, le=100_000)] = Field(1, description="draws per grid point")
    seed: Annotated[int, Field(ge=0, lt=2**32)] = Field(0, description="seed of the draws")
    metric: str | None = Field(None, description="a final metric of the runs; default: the main metric")
    mode: Literal["min", "max"] | None = Field(None, description="default: max for IoU/PSNR, min otherwise")
    iterations: Annotated[int, Field(ge=1)] | None = Field(None, description="optimize.iterations of every trial")
    concurrent: Annotated[int, Field(ge=1)] | None = Field(None, description="trials at once (default: as many "
                                                                             "as the resources allow)")
    resources: Resources = Field(default_factory=Resources)
    retries: Annotated[int, Field(ge=0, le=100)] = Field(2, description="retries of a trial whose worker died")
    early_stop: EarlyStop | None = Field(None, description="ASHA early stopping (off by default)")
    out: str | None = Field(None, description="output folder, a relative folder inside runs/ (default runs/<name>)")

    @field_validator("out")
    @classmethod
    def _inside_runs(cls, out: str | None) -> str | None:
        if out is not None:
            wanted = Path(out)
            if wanted.is_absolute() or ".." in wanted.parts or not wanted.parts:
                raise PydanticCustomError("output_dir", "must be a relative folder inside runs/ (a sweep file cannot "
                                                        "write elsewhere; use --out for that)")
        return out

    @property
    def scenes(self) -> list[str]:
        return [self.scene] if isinstance(self.scene, str) else list(self.scene)

    def resolved_mode(self, metric: str) -> str:
        return self.mode or ("max" if any(word in metric for word in MAXIMISED) else "min")


def read_sweep_file(path: Path) -> dict:
    """The mapping in a sweep file; ConfigError (key path "SWEEP") for a missing, special, oversized, non-UTF-8,
    empty or non-mapping file and for YAML syntax errors (with line and column): the scene file's checks."""
    return read_yaml(path, key="SWEEP", what="sweep file", max_bytes=MAX_SWEEP_BYTES,
                     holds="a mapping (scene:, params:, ...)")


def parse_param_option(text: str) -> tuple[str, dict]:
    """``--param KEY=V1,V2,...`` (a grid) or ``KEY=uniform:LOW,HIGH`` (also loguniform, randint, choice) -> (key,
    distribution mapping). Values are YAML (``1e4``, ``true``, ``[0.5, 0.5, 0.5]``); commas inside brackets do not
    split."""
    option = f"--param {text}"
    if "=" not in text:
        raise ConfigError(option, "expected KEY=V1,V2,... or KEY=uniform:LOW,HIGH (also loguniform, randint, choice)")
    key, values = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(option, "empty key")
    kind = "grid"
    head, colon, rest = values.partition(":")
    if colon and head.strip() in DISTRIBUTIONS:
        kind, values = head.strip(), rest
    items, depth, start = [], 0, 0
    for i, char in enumerate(values + ","):
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            items.append(values[start:i])
            start = i + 1
    parsed = []
    for item in items:
        if not item.strip():
            raise ConfigError(option, "an empty value (two commas in a row, or a trailing comma?)")
        try:
            parsed.append(parse_yaml(item))
        except yaml.YAMLError as exc:
            raise ConfigError(option, f"cannot parse value {item!r}: {yaml_problem(exc)}") from None
    return key, {kind: parsed}


def parse_set_option(text: str) -> tuple[str, Any]:
    """``--set KEY=VALUE`` of the sweep command -> (key, value): an override for every trial."""
    if "=" not in text:
        raise ConfigError(f"--set {text}", "expected KEY=VALUE, e.g. sim.dt=0.001")
    key, value = text.split("=", 1)
    try:
        return key.strip(), (parse_yaml(value) if value.strip() else None)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key.strip()}", f"cannot parse value {value!r}: {yaml_problem(exc)}") from None


def load_sweep(path: Path | None = None, *, scenes: list[str] = (), params: list[str] = (), sets: list[str] = (),
               options: dict | None = None) -> tuple[SweepSpec, Path]:
    """The sweep: the file at ``path`` (optional) with the command line's shortcuts on top: ``scenes`` replace its
    scene(s), ``params`` (``KEY=V1,V2``) add or replace varied keys, ``sets`` (``KEY=VALUE``) add fixed overrides,
    ``options`` (name -> value, None = not given) replace top-level keys. Returns (spec, the folder scene paths are
    relative to). ConfigError (exit 2) names the key path of every problem."""
    raw = read_sweep_file(path) if path is not None else {}
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    if scenes:
        raw["scene"] = [str(s) for s in scenes] if len(scenes) > 1 else str(scenes[0])
    if params:
        raw["params"] = dict(raw.get("params") or {}) if isinstance(raw.get("params", {}), dict) else raw["params"]
        for text in params:
            key, dist = parse_param_option(text)
            raw["params"][key] = dist
    if sets:
        raw["set"] = dict(raw.get("set") or {}) if isinstance(raw.get("set", {}), dict) else raw["set"]
        for text in sets:
            key, value = parse_set_option(text)
            raw["set"][key] = value
    for key, value in (options or {}).items():
        if value is not None:
            if key in ("cpus", "gpus"):
                resources = raw.get("resources")
                raw["resources"] = {**(resources if isinstance(resources, dict) else {}), key: value}
            else:
                raw[key] = value
    if "scene" not in raw:
        raise ConfigError("scene", "required: give a sweep file with scene: or --scene SCENE")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise _config_error(exc, raw) from None
    if spec.name is None:
        spec.name = Path(path).stem if path is not None else f"{Path(spec.scenes[0]).stem}-sweep"
    for key in spec.params:
        if key in spec.set:
            raise ConfigError(f"params.{key}", "is also in set: a key is either varied or fixed")
    if spec.iterations is not None and "optimize.iterations" in {*spec.params, *spec.set}:
        raise ConfigError("iterations", "optimize.iterations is also set or varied: give it once")
    if not spec.params and len(spec.scenes) == 1 and spec.samples == 1:
        raise ConfigError("params", "nothing varies: give params (or --param KEY=V1,V2), several scenes or samples > 1")
    if spec.early_stop is not None and spec.iterations is None and "optimize.iterations" in spec.params:
        raise ConfigError("early_stop", "not with optimize.iterations varied (the trials' rungs would differ)")
    return spec, base
