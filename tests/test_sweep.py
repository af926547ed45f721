"""`diffmpm sweep` on a local Ray (CPU): a 4-trial sweep in which one trial's worker dies mid-run and is retried
from its checkpoint, a rerun that skips finished trials and resumes an unfinished one, and bad sweep input refused
with one error line, exit 2, nothing written."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import BASE_SCENE, REPO
from typer.testing import CliRunner

from diffmpm_cli.cli import app
from diffmpm_cli.config import load_scene
from diffmpm_cli.sweep.spec import load_sweep, parse_param_option
from diffmpm_cli.sweep.trials import metric_names, short_keys, trial_names
from diffmpm_cli.sweep.worker import CRASH_ONCE, numeric

pytest.importorskip("ray.tune", reason="diffmpm[sweep] (Ray Tune) is not installed")

runner = CliRunner()
# the conftest scene, smaller still (12^3 grid, 10 steps, 16^2 pictures): 2 iterations, a checkpoint after each, no
# turntable, a small exact evaluation
TINY = {**copy.deepcopy(BASE_SCENE), "optimize": {"iterations": 2, "checkpoint_every": 1, "render_every": 0},
        "output": {"turntable_frames": 0}, "evaluate": {"size": 16}, "appearance": {"surface_samples": 300}}
TINY["sim"].update(steps=10, frames=[5], control_stride=5, grid_resolution=12)
TINY["render"].update(width=16, height=16)
SWEEP = {"scene": "tiny.yaml", "params": {"learn.dFc.lr": [0.005, 0.02], "loss.silhouette": [0.5, 1.0]},
         "resources": {"cpus": 1}}
CRASHED = "dFc.lr=0.02__loss.silhouette=1"  # the trial whose worker dies once after its second iteration


def write_sweep(folder, sweep=None, scene=None):
    (folder / "tiny.yaml").write_text(yaml.safe_dump(scene or TINY, sort_keys=False))
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep or SWEEP, sort_keys=False))
    return path


def sweep_cli(folder, *args, env=None):
    """`diffmpm sweep` in a fresh process (as a user runs it): its own local Ray."""
    command = [sys.executable, "-m", "diffmpm_cli", "sweep", *map(str, args)]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    write_sweep(folder)
    marker = folder / "crashed.txt"
    done = sweep_cli(folder, "sweep.yaml", "--out", "out", "--json", env={CRASH_ONCE: f"{CRASHED}:2:{marker}"})
    return folder, marker, done


def test_a_four_trial_sweep_survives_a_killed_worker(swept):
    folder, marker, done = swept
    assert done.returncode == 0, done.stderr[-3000:]
    assert marker.is_file(), "the worker was not killed: the test proves nothing"
    result = json.loads(done.stdout)
    trials = {r["trial"]: r for r in result["trials"]}
    assert sorted(trials) == ["dFc.lr=0.005__loss.silhouette=0.5", "dFc.lr=0.005__loss.silhouette=1",
                              "dFc.lr=0.02__loss.silhouette=0.5", "dFc.lr=0.02__loss.silhouette=1"]
    assert all(r["status"] == "finished" and r["iterations"] == 2 for r in trials.values()), trials
    # the killed trial was retried once, and the retry went on from the checkpoint of its first iteration
    assert trials[CRASHED]["retries"] == 1 and sum(r["retries"] for r in trials.values()) == 1
    summary = json.loads((folder / "out" / CRASHED / "summary.json").read_text())
    assert summary["resumed_from_iteration"] == 1 and summary["iterations"] == 2
    assert f"{CRASHED}: " in done.stderr and "retrying" in done.stderr
    # every trial is an ordinary run folder with the sweep's overrides applied as --set does
    for name, record in trials.items():
        run = folder / "out" / name
        cfg = load_scene(run / "config.resolved.yaml")
        assert cfg.learn.dFc.lr == record["params"]["learn.dFc.lr"]
        assert cfg.loss.silhouette == record["params"]["loss.silhouette"]
        assert cfg.optimize.iterations == 2
        final = json.loads((run / "summary.json").read_text())["final"]
        assert record["value"] == final["silhouette_iou_mean"]
        # the metrics a sweep may rank by are exactly what a run of this scene reports
        assert set(numeric(final)) == set(metric_names(cfg)), set(numeric(final)) ^ set(metric_names(cfg))
    # sorted by the metric (an IoU: the largest first), the best named
    values = [r["value"] for r in result["trials"]]
    assert result["metric"] == "silhouette_iou_mean" and result["mode"] == "max" and values == sorted(values)[::-1]
    assert result["best"]["trial"] == result["trials"][0]["trial"]
    rows = list(csv.DictReader((folder / "out" / "sweep.csv").open()))
    assert [r["trial"] for r in rows] == [r["trial"] for r in result["trials"]]
    assert {"learn.dFc.lr", "loss.silhouette", "value", "silhouette_iou_mean", "chamfer_exact"} <= set(rows[0])
    lines = [json.loads(x) for x in (folder / "out" / "sweep.jsonl").read_text().splitlines()]
    assert [r["trial"] for r in lines] == [r["trial"] for r in result["trials"]]
    assert (folder / "out" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # nothing of Ray's or Tune's in the sweep's folder
    assert sorted(p.name for p in (folder / "out").iterdir() if not p.is_dir()) == ["sweep.csv", "sweep.jsonl",
                                                                                      "sweep.png", "sweep.yaml"]


def test_a_rerun_skips_finished_trials_and_resumes_an_unfinished_one(swept):
    folder, _, done = swept
    assert done.returncode == 0
    out = folder / "out"
    # as a sweep killed during a trial leaves it: the checkpoint of iteration 1, no summary, no final outputs
    victim = out / "dFc.lr=0.005__loss.silhouette=0.5"
    for name in ("summary.json", "checkpoints/iter_000002.pt"):
        (victim / name).unlink()
    before = {p.name: (p / "summary.json").stat().st_mtime_ns for p in out.iterdir() if (p / "summary.json").exists()}
    again = sweep_cli(folder, "sweep.yaml", "--out", "out")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 trial(s) run" not in again.stdout and "0 trial(s) run, 1 resumed, 3 done earlier" in again.stdout
    assert "best: " in again.stdout and "finished (earlier)" in again.stdout
    after = {p.name: (p / "summary.json").stat().st_mtime_ns for p in out.iterdir() if (p / "summary.json").exists()}
    assert {k: after[k] for k in before} == before  # the finished runs were not touched
    assert json.loads((victim / "summary.json").read_text())["resumed_from_iteration"] == 1
    records = {r["trial"]: r for r in map(json.loads, (out / "sweep.jsonl").read_text().splitlines())}
    assert records[victim.name]["session"] == "resumed" and records[victim.name]["status"] == "finished"
    assert sum(r["session"] == "skipped" for r in records.values()) == 3
    # nothing left to do: no Ray at all, the same table
    third = runner.invoke(app, ["sweep", str(folder / "sweep.yaml"), "--out", str(out), "--json"])
    assert third.exit_code == 0, third.stderr
    assert all(r["session"] == "skipped" for r in json.loads(third.stdout)["trials"])


def test_early_stopping_stops_trials_behind_the_first(tmp_path):
    """ASHA with one trial at a time: the first (the largest step) sets the rungs, the smaller steps fall behind it
    at the first rung and are stopped there; the stopped trials keep their run folders (no summary) and a rerun
    leaves them stopped."""
    sweep = {"scene": "tiny.yaml", "params": {"learn.dFc.lr": [0.064, 0.004, 0.001]}, "iterations": 4,
             "concurrent": 1, "early_stop": {"grace": 1, "reduction": 2}}
    write_sweep(tmp_path, sweep)
    done = sweep_cli(tmp_path, "sweep.yaml", "--out", "out", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    trials = {r["trial"]: r for r in json.loads(done.stdout)["trials"]}
    first = trials["dFc.lr=0.064"]
    assert first["status"] == "finished" and first["iterations"] == 4
    for name in ("dFc.lr=0.004", "dFc.lr=0.001"):
        assert trials[name]["status"] == "stopped" and trials[name]["iterations"] < 4, trials[name]
        assert trials[name]["value"] < first["value"]
        assert not (tmp_path / "out" / name / "summary.json").exists()
    again = runner.invoke(app, ["sweep", str(tmp_path / "sweep.yaml"), "--out", str(tmp_path / "out"), "--json"])
    assert again.exit_code == 0, again.stderr
    assert {r["trial"]: (r["status"], r["session"]) for r in json.loads(again.stdout)["trials"]} == {
        "dFc.lr=0.064": ("finished", "skipped"), "dFc.lr=0.004": ("stopped", "skipped"),
        "dFc.lr=0.001": ("stopped", "skipped")}


def test_an_unreachable_cluster_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray"))  # where `auto` looks: no Ray started by anyone else
    path = write_sweep(tmp_path)
    refused(invoke(path, "--out", tmp_path / "out", "--address", "auto"), "--address: cannot reach a Ray cluster")
    assert not (tmp_path / "out").exists()


def invoke(*args):
    return runner.invoke(app, ["sweep", *map(str, args)])


def refused(result, expected: str):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("change, expected", [
    ({"parms": {}}, "parms: unknown key (did you mean 'params'?)"),
    ({"params": {"learn.dFc.lrr": [0.1, 0.2]}}, "params.learn.dFc.lrr: unknown key (did you mean 'lr'?)"),
    ({"params": {"learn.dFc.lr": {"uniform": [0.2, 0.1]}}}, "params.learn.dFc.lr: "),
    ({"params": {"learn.dFc.lr": {"uniform": [0.1, 0.2], "grid": [1]}}}, "params.learn.dFc.lr: "),
    ({"params": {"learn.dFc.lr": []}}, "params.learn.dFc.lr: must have at least 1 items"),
    ({"params": {}}, "params: nothing varies"),
    ({"set": {"sim.dtt": 0.001}}, "set.sim.dtt: unknown key (did you mean 'dt'?)"),
    ({"metric": "chamfer_exac"}, "metric: 'chamfer_exac' is not a metric"),
    ({"mode": "up"}, "mode: must be one of 'min' or 'max'"),
    ({"scene": "missing.yaml"}, ""),
    ({"resources": {"gpus": -1}}, "resources.gpus"),
    ({"early_stop": {"metric": "chamfer_exact"}}, "early_stop.metric: 'chamfer_exact' is not in every line"),
    ({"out": "../elsewhere"}, "out: must be a relative folder inside runs/"),
    ({"resources": {"gpus": "many"}}, "resources.gpus: must be a number"),
])
def test_bad_sweep_files_are_refused_with_one_line_and_nothing_written(tmp_path, change, expected):
    path = write_sweep(tmp_path, {**SWEEP, **change})
    refused(invoke(path, "--out", tmp_path / "out"), expected)
    assert not (tmp_path / "out").exists()
    if "out" in change:  # refused without --out too (where it would be used)
        refused(invoke(path), expected)


def test_bad_command_lines_and_folders_are_refused(tmp_path):
    path = write_sweep(tmp_path)
    (tmp_path / "broken.yaml").write_text("scene: [a\n")
    refused(invoke(tmp_path / "broken.yaml"), "SWEEP: ")
    refused(invoke(tmp_path / "absent.yaml"), "SWEEP: sweep file not found")
    refused(invoke("--param", "learn.dFc.lr=0.1"), "scene: required")
    refused(invoke("--scene", tmp_path / "tiny.yaml", "--param", "learn.dFc.lr"), "--param learn.dFc.lr: expected")
    refused(invoke("--scene", tmp_path / "tiny.yaml", "--param", "learn.dFc.lr=0.1,,0.2"), "--param learn.dFc.lr=")
    refused(invoke(path, "--gpus-per-trial", "many"), "--gpus-per-trial: must be a number or auto")
    # an output folder holding someone else's files, and a trial folder that is not a run: never written into
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused(invoke(path, "--out", foreign), "--out: ")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    out = tmp_path / "out"
    (out / "dFc.lr=0.005__loss.silhouette=0.5").mkdir(parents=True)
    (out / "sweep.yaml").write_text("earlier")
    (out / "dFc.lr=0.005__loss.silhouette=0.5" / "data.bin").write_text("mine")
    refused(invoke(path, "--out", out), "trial dFc.lr=0.005__loss.silhouette=0.5: ")
    assert (out / "sweep.yaml").read_text() == "earlier" and len(list(out.iterdir())) == 2


def test_without_ray_the_command_says_how_to_install_it(tmp_path, monkeypatch):
    path = write_sweep(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    refused(invoke(path, "--out", tmp_path / "out"), 'diffmpm sweep: needs Ray Tune, which is not installed here: '
                                                     'pip install "diffmpm[sweep]"')
    assert not (tmp_path / "out").exists()


def test_trial_values_out_of_range_become_failed_trials_not_a_refused_sweep(tmp_path):
    """nu = 0.6 is one trial's bad parameter: that trial is recorded as failed (never run), the others are kept."""
    write_sweep(tmp_path)
    spec, base = load_sweep(tmp_path / "sweep.yaml", params=["learn.nu.init=0.3,0.6"],
                            sets=["learn.nu.enabled=true"])
    from diffmpm_cli.sweep import prepare

    trials, metric, mode = prepare(spec=spec, scenes=[tmp_path / "tiny.yaml"], out=tmp_path / "out")
    bad = [t for t in trials if t.params["learn.nu.init"] == 0.6]
    assert len(trials) == 8 and len(bad) == 4
    assert all(t.state == "failed" and t.error.startswith("learn.nu.init: must be < 0.5") for t in bad)
    assert all(t.state == "new" and t.error is None for t in trials if t not in bad)
    assert (metric, mode) == ("silhouette_iou_mean", "max") and not (tmp_path / "out").exists()


def test_several_scenes_are_a_grid_dimension(tmp_path):
    """Two base scenes x two values: four trials named by scene and value, each with its own scene."""
    from diffmpm_cli.sweep import prepare

    write_sweep(tmp_path)
    other = {**copy.deepcopy(TINY), "name": "other"}
    other["source"] = {"shape": "box", "size": [0.25, 0.25, 0.25], "center": [0.5, 0.5, 0.5]}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other, sort_keys=False))
    spec, base = load_sweep(tmp_path / "sweep.yaml", scenes=[str(tmp_path / "tiny.yaml"), str(tmp_path / "other.yaml")],
                            params=["learn.dFc.lr=0.01,0.02"])
    spec.params.pop("loss.silhouette")
    trials, metric, mode = prepare(spec=spec, scenes=[tmp_path / "tiny.yaml", tmp_path / "other.yaml"],
                                   out=tmp_path / "out")
    assert sorted(t.name for t in trials) == ["other__dFc.lr=0.01", "other__dFc.lr=0.02", "tiny__dFc.lr=0.01",
                                              "tiny__dFc.lr=0.02"]
    shapes = {t.name.split("__")[0]: t.scene.source.shape for t in trials}
    assert shapes == {"tiny": "sphere", "other": "box"}
    assert all(t.params["scene"] == t.name.split("__")[0] for t in trials)


def test_random_draws_come_back_with_the_same_seed(tmp_path):
    """Draws are Tune's, seeded: the same sweep file gives the same trials (so a rerun finds their folders), another
    seed other ones; a grid point with two draws gets two trials."""
    from diffmpm_cli.sweep import prepare

    sweep = {"scene": "tiny.yaml", "params": {"learn.dFc.lr": {"loguniform": [1e-3, 1e-1]},
                                              "loss.silhouette": [0.5, 1.0]}, "samples": 2}
    path = write_sweep(tmp_path, sweep)

    def drawn(seed=None):
        spec, base = load_sweep(path, options={"seed": seed})
        trials, _, _ = prepare(spec=spec, scenes=[tmp_path / "tiny.yaml"], out=tmp_path / "out")
        return [(t.name, t.params["learn.dFc.lr"]) for t in trials]

    first = drawn()
    assert first == drawn() and len(first) == 4 and len({name for name, _ in first}) == 4
    assert all(1e-3 <= lr <= 1e-1 for _, lr in first) and len({lr for _, lr in first}) == 4
    assert sum(name.endswith("__sample=1") for name, _ in first) == 2
    assert {lr for _, lr in drawn(seed=1)}.isdisjoint({lr for _, lr in first})


def test_a_trial_reports_failures_runs_and_finished_folders(tmp_path, monkeypatch):
    """The worker's function without Ray (Tune's report captured): a time step the trial's E makes unstable is a
    failed trial with the run's own error line and no folder; a run reports every iteration, then its final
    metrics; a finished folder is reported from its summary without running again."""
    import ray.tune

    from diffmpm_cli.config import dump_scene
    from diffmpm_cli.sweep.worker import run_trial

    reports: list[dict] = []
    monkeypatch.setattr(ray.tune, "report", lambda metrics: reports.append(dict(metrics)))
    write_sweep(tmp_path)

    def job(name, *overrides):
        scene = load_scene(tmp_path / "tiny.yaml", list(overrides))
        return {name: {"scene": dump_scene(scene), "base_dir": str(tmp_path), "run_dir": str(tmp_path / name),
                       "device": "cpu"}}

    stiff = job("stiff", "learn.E.enabled=true", "learn.E.init=1e9")
    run_trial({"trial": "stiff"}, trials=stiff)
    assert reports[-1]["trial_status"] == "failed" and "unstable time step" in reports[-1]["trial_error"]
    assert not (tmp_path / "stiff").exists()
    reports.clear()
    ok = job("ok")
    run_trial({"trial": "ok"}, trials=ok)
    assert [r["iteration"] for r in reports] == [1, 2, 2] and reports[-1]["trial_status"] == "finished"
    final = json.loads((tmp_path / "ok" / "summary.json").read_text())["final"]
    assert reports[-1]["silhouette_iou_mean"] == final["silhouette_iou_mean"]
    reports.clear()
    before = (tmp_path / "ok" / "summary.json").stat().st_mtime_ns
    run_trial({"trial": "ok"}, trials=ok)
    assert len(reports) == 1 and reports[0]["trial_status"] == "finished"
    assert (tmp_path / "ok" / "summary.json").stat().st_mtime_ns == before


def test_param_shortcuts_and_names():
    assert parse_param_option("learn.E.init=1e4,3e4") == ("learn.E.init", {"grid": [1e4, 3e4]})
    assert parse_param_option("source.center=[0.5,0.5,0.5],[0.4,0.5,0.5]") == (
        "source.center", {"grid": [[0.5, 0.5, 0.5], [0.4, 0.5, 0.5]]})
    assert parse_param_option("learn.nu.init=uniform:0.2,0.45") == ("learn.nu.init", {"uniform": [0.2, 0.45]})
    assert short_keys(["learn.E.init", "learn.nu.init", "loss.volume", "seed"]) == {
        "learn.E.init": "E.init", "learn.nu.init": "nu.init", "loss.volume": "loss.volume", "seed": "seed"}
    assert short_keys(["a.b.c", "x.b.c"]) == {"a.b.c": "a.b.c", "x.b.c": "x.b.c"}
    points = [{"a.x": 1e-5, "__sample": 0}, {"a.x": "p/q", "__sample": 0}, {"a.x": "p_q", "__sample": 0}]
    names = trial_names(points, ["a.x"], samples=1)
    assert names[0] == "a.x=1e-05" and all("/" not in n for n in names) and len(set(names)) == 3
    long = trial_names([{"k": "v" * 300, "__sample": 0}], ["k"], samples=1)[0]
    assert len(long) <= 100


def test_the_help_has_examples():
    result = invoke("--help")
    assert result.exit_code == 0 and "Examples" in result.stdout and "--address" in result.stdout


def test_the_example_sweeps_are_valid(tmp_path):
    """The sweeps docs/SWEEPS.md runs: each loads, names scenes that exist, and expands to valid trials."""
    from diffmpm_cli.sweep import prepare

    paths = sorted((REPO / "scenes" / "sweeps").glob("*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        spec, base = load_sweep(path)
        trials, metric, mode = prepare(spec=spec, scenes=[base / s for s in spec.scenes], out=tmp_path / path.stem)
        assert len(trials) >= 3 and all(t.error is None for t in trials), path
