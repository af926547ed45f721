"""`diffmpm optimize` / `diffmpm render`: outputs, resume (also after kill -9), PLY round trip, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO
from typer.testing import CliRunner

from diffmpm_cli.assets import build_assets
from diffmpm_cli.cli import app
from diffmpm_cli.config import load_scene
from diffmpm_cli.optimize.checkpoint import latest_checkpoint, load_checkpoint
from diffmpm_cli.optimize.run import RunInterrupted, StopFlag, optimize
from diffmpm_cli.outputs.ply import read_gaussians_ply
from diffmpm_cli.render.rasterize import rasterization

SCENE = REPO / "scenes" / "sphere_to_snowman.yaml"
# a small, fast version of the default scene
SMALL = ["sim.steps=20", "sim.frames=[10]", "render.width=32", "render.height=32", "appearance.surface_samples=600",
         "optimize.iterations=4", "optimize.checkpoint_every=2", "optimize.render_every=2", "output.turntable_frames=4"]
runner = CliRunner()


def small_scene(*extra):
    return load_scene(SCENE, [*SMALL, *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    scene = small_scene()
    summary = optimize(scene=scene, assets=build_assets(scene), out_dir=out)
    return out, summary


def test_a_run_writes_every_output(finished):
    out, summary = finished
    for name in ["config.resolved.yaml", "metrics.jsonl", "summary.json", "final/gaussians.ply", "final/particles.ply",
                 "final/trajectory.npz", "final/comparison.png", "final/turntable.gif", "final/loss.png",
                 "checkpoints/best.pt", "checkpoints/iter_000004.pt", "renders/iter_000000_view0.png",
                 "renders/iter_000002_view3.png"]:
        assert (out / name).is_file(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [0, 1, 2, 3]
    assert {"loss", "silhouette", "grid_mass", "rgb_l1", "silhouette_iou_mean", "chamfer", "volume_iou"} <= set(lines[0])
    assert summary == json.loads((out / "summary.json").read_text()) | {"main_metric": list(summary["main_metric"])} \
        or json.loads((out / "summary.json").read_text())["iterations"] == 4
    assert summary["final"]["loss"] < summary["initial"]["loss"]
    assert summary["final"]["silhouette_iou_mean"] > summary["initial"]["silhouette_iou_mean"]
    trajectory = np.load(out / "final" / "trajectory.npz")
    assert trajectory["x"].shape[0] == 2 and list(trajectory["steps"]) == [10, 20]
    assert load_scene(out / "config.resolved.yaml") == small_scene()


def test_gaussians_ply_renders_the_final_image(finished):
    """Read back gaussians.ply (3DGS layout) and render it: it reproduces the run's final render."""
    out, _ = finished
    from diffmpm_cli.pipeline import Pipeline

    scene = small_scene()
    pipe = Pipeline(scene, build_assets(scene))
    params = load_checkpoint(latest_checkpoint(out / "checkpoints"))["params"]
    with torch.no_grad():
        result = pipe.simulate(params)
        expected, _, _ = pipe.render(*pipe.gaussians(result.x[-1], result.F[-1], params))
    g = {k: torch.from_numpy(v) for k, v in read_gaussians_ply(out / "final" / "gaussians.ply").items()}
    image, _, _ = rasterization(g["means"], g["covars"], g["opacities"], g["colors"], pipe.viewmats, pipe.Ks,
                                pipe.width, pipe.height, backgrounds=pipe.background, near_plane=scene.render.near,
                                far_plane=scene.render.far, rasterize_mode=scene.render.rasterize_mode)
    assert float((image - expected).abs().max()) <= 1e-3


def test_resume_after_an_interrupt_ends_where_an_uninterrupted_run_ends(finished, tmp_path):
    out_full, summary_full = finished
    scene = small_scene()
    stop = StopFlag()

    def progress(i, n, record):
        if i == 1:
            stop.requested = True

    with pytest.raises(RunInterrupted):
        optimize(scene=scene, assets=build_assets(scene), out_dir=tmp_path, stop=stop, progress=progress)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "iter_000001.pt"
    summary = optimize(scene=scene, assets=build_assets(scene), out_dir=tmp_path, resume=True)
    full = load_checkpoint(out_full / "checkpoints" / "iter_000004.pt")["params"]
    resumed = load_checkpoint(tmp_path / "checkpoints" / "iter_000004.pt")["params"]
    for k in full:
        assert torch.equal(full[k], resumed[k]), k  # bitwise: the CPU kernels are deterministic
    assert summary["final"]["loss"] == summary_full["final"]["loss"]
    a = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (out_full / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_kill_minus_9_then_resume(finished, tmp_path):
    """A run killed with SIGKILL mid-way leaves loadable checkpoints; --resume ends with the same metrics."""
    _, summary_full = finished
    out = tmp_path / "run"
    args = [sys.executable, "-m", "diffmpm_cli", "optimize", str(SCENE), "--out", str(out), "--quiet"]
    for item in SMALL:
        args += ["--set", item]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while latest_checkpoint(out / "checkpoints") is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for path in (out / "checkpoints").glob("*.pt"):
        load_checkpoint(path)  # none is torn
    result = runner.invoke(app, ["optimize", "--resume", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["final"]["loss"] == pytest.approx(summary_full["final"]["loss"], rel=1e-6)
    assert summary["final"]["chamfer"] == pytest.approx(summary_full["final"]["chamfer"], rel=1e-6)
    assert not list((out / "checkpoints").glob(".*.tmp"))
    os.sync()


def test_render_a_run_and_a_scene(finished, tmp_path):
    out, _ = finished
    result = runner.invoke(app, ["render", str(out), "--frames", "0,20", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "a").iterdir())[:2] == ["orbit0_step00000.png", "orbit0_step00020.png"]
    result = runner.invoke(app, ["render", str(SCENE), "--cameras", "orbit:3", "--format", "gif", "--size", "48x40",
                                 "--out", str(tmp_path / "b"), *sum((["--set", s] for s in SMALL), [])])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["turntable0.gif", "turntable1.gif", "turntable2.gif"]
    for bad in (["--frames", "999"], ["--cameras", "side"], ["--format", "bmp"], ["--size", "big"]):
        result = runner.invoke(app, ["render", str(out), *bad])
        assert result.exit_code == 2, (bad, result.output)


def test_bad_input_and_failed_runs(finished, tmp_path, monkeypatch):
    out, _ = finished
    result = runner.invoke(app, ["optimize", str(SCENE), "--out", str(out)])
    assert result.exit_code == 2 and "already holds a run" in result.output
    result = runner.invoke(app, ["optimize", "--resume", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "holds no run" in result.output
    result = runner.invoke(app, ["optimize", str(SCENE), "--set", "learn.dFc.enabled=false", "--set",
                                 "learn.color.enabled=false", "--set", "learn.sigma0.enabled=false", "--out",
                                 str(tmp_path / "refused")])
    assert result.exit_code == 2 and "nothing is learned" in result.output
    assert not (tmp_path / "refused").exists()  # bad input writes nothing
    result = runner.invoke(app, ["optimize", str(REPO / "scenes" / "elastic_drop.yaml"), "--set",
                                 "optimize.episodes=2"])
    assert result.exit_code == 2 and "optimize.episodes" in result.output
    from diffmpm_cli.outputs import pictures

    if not pictures.mp4_available():
        result = runner.invoke(app, ["optimize", str(SCENE), "--set", "output.video=mp4"])
        assert result.exit_code == 2 and "output.video" in result.output

    import diffmpm_cli.optimize.run as run_module

    def nan_loss(*args, **kwargs):
        return torch.tensor(float("nan"), dtype=torch.float64, requires_grad=True), {}

    monkeypatch.setattr(run_module, "scene_loss", nan_loss)
    result = runner.invoke(app, ["optimize", str(SCENE), "--out", str(tmp_path / "nan"), *sum((["--set", s] for s in
                                                                                              SMALL), [])])
    assert result.exit_code == 1 and "the loss is nan" in result.output
    assert "Traceback" not in result.output

    from diffmpm_cli.errors import SimulationError
    from diffmpm_cli.pipeline import Pipeline

    def blow_up(self, params, **kwargs):
        raise SimulationError("non-finite particle state (F) after step 7")

    monkeypatch.setattr(Pipeline, "simulate", blow_up)
    result = runner.invoke(app, ["optimize", str(SCENE), "--out", str(tmp_path / "boom"), *sum((["--set", s] for s in
                                                                                               SMALL), [])])
    assert result.exit_code == 1 and "iteration 0: non-finite particle state" in result.output


def test_episodes_start_from_the_previous_final_state(tmp_path):
    """Two episodes of 2 iterations: the second starts where the first ended, with fresh controls; a resume from
    the checkpoint inside episode 2 ends bitwise where the uninterrupted run ends."""
    scene = small_scene("optimize.episodes=2", "optimize.iterations=2", "optimize.checkpoint_every=1")
    summary = optimize(scene=scene, assets=build_assets(scene), out_dir=tmp_path / "a")
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in lines] == [0, 0, 1, 1] and summary["episodes"] == 2
    ckpt = load_checkpoint(tmp_path / "a" / "checkpoints" / "iter_000004.pt")
    assert ckpt["start"] is not None and ckpt["start"]["x"].shape[1] == 3
    # episode 2 started from a deformed state: its first loss is below episode 1's first
    assert lines[2]["loss"] < lines[0]["loss"]
    stop = StopFlag()

    def progress(i, n, record):
        if i == 3:
            stop.requested = True

    with pytest.raises(RunInterrupted):
        optimize(scene=scene, assets=build_assets(scene), out_dir=tmp_path / "b", stop=stop, progress=progress)
    optimize(scene=scene, assets=build_assets(scene), out_dir=tmp_path / "b", resume=True)
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "iter_000004.pt")["params"]
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "iter_000004.pt")["params"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _Boom:
    """A pickled object that would run code when unpickled by a permissive loader."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/diffmpm_pwned",))


def test_a_checkpoint_holding_code_is_refused_not_run(finished, tmp_path):
    out, _ = finished
    ckpt = load_checkpoint(out / "checkpoints" / "iter_000004.pt")
    ckpt["extra"] = _Boom()
    bad = tmp_path / "evil.pt"
    torch.save(ckpt, bad)
    marker = "/tmp/diffmpm_pwned"
    if os.path.exists(marker):
        os.unlink(marker)
    result = runner.invoke(app, ["render", str(out), "--checkpoint", str(bad), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "not a loadable diffmpm checkpoint" in result.output and "Traceback" not in result.output
    assert not os.path.exists(marker)


def test_the_summary_reports_validity_and_the_exact_target(finished):
    out, summary = finished
    final = summary["final"]
    for key in ("inverted_share", "inverted_share_any_step", "det_F_min", "det_F_median", "clumped_share",
                "max_per_cell", "exact_iou_mean", "exact_iou_unseen_mean", "chamfer_exact"):
        assert key in final, key
    assert len(final["exact_iou"]) == 12 and summary["physically_valid"] is True
    assert 0.0 < summary["target_gaussians_exact_iou_mean"] <= 1.0
    assert (out / "final" / "comparison_training.png").is_file()
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"inverted_share_any_step", "clumped_share", "physically_valid"} <= set(line)


def test_pruning_and_resume_ignore_files_this_run_did_not_write(tmp_path):
    scene = small_scene("optimize.keep_checkpoints=1", "optimize.iterations=2")
    optimize(scene=scene, assets=build_assets(scene), out_dir=tmp_path)
    ckpts = tmp_path / "checkpoints"
    foreign = ckpts / "iter_000100.pt"
    torch.save({"mine": False}, foreign)
    assert latest_checkpoint(ckpts).name == "iter_000002.pt"  # never resumed from a foreign file
    scene = small_scene("optimize.keep_checkpoints=1", "optimize.iterations=4")
    summary = optimize(scene=scene, assets=build_assets(scene), out_dir=tmp_path, resume=True)
    assert summary["iterations"] == 4
    assert foreign.exists()  # not ours: never deleted
    assert sorted(p.name for p in ckpts.glob("iter_*.pt")) == ["iter_000004.pt", "iter_000100.pt"]


def test_out_refuses_a_folder_that_holds_other_files(tmp_path):
    (tmp_path / "summary.json").write_text("mine, not diffmpm's")
    result = runner.invoke(app, ["optimize", str(SCENE), "--out", str(tmp_path), *sum((["--set", s] for s in SMALL), [])])
    assert result.exit_code == 2 and "not empty and holds no diffmpm run" in result.output
    assert (tmp_path / "summary.json").read_text() == "mine, not diffmpm's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_scene_cannot_send_outputs_outside_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad in ("output.dir=/tmp/elsewhere", "output.dir=../../x"):
        result = runner.invoke(app, ["optimize", str(SCENE), "--set", bad, *sum((["--set", s] for s in SMALL), [])])
        assert result.exit_code == 2 and "output.dir: must be a relative folder inside runs/" in result.output
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "x").exists()
    from diffmpm_cli.cli.optimize import _default_out

    for name in ("../../x", "/etc/evil", "a" * 300, "ok name"):
        out = _default_out(name)
        assert out.parent.name == "runs" and "/" not in out.name and ".." not in out.name and len(out.name) <= 96


def test_a_nonfinite_gradient_steps_back_with_the_line_search(tmp_path, monkeypatch):
    """A finite rollout whose adjoint overflows (seen on the GPU cat, atomics' order decides): with the line search on,
    the run goes back to the parameters before the last accepted step, with smaller steps and fresh moments, says so
    in metrics.jsonl, and goes on; without it, or when it happens again and again, the run fails (exit 1)."""
    from diffmpm_cli.errors import SimulationError
    from diffmpm_cli.sim.graphs import GraphedRollout
    from diffmpm_cli.sim.solver import Rollout

    calls = []

    def flaky(real):
        def backward(self, grads):
            calls.append(1)
            if len(calls) == 2:
                raise SimulationError("non-finite gradient in the MPM backward pass")
            return real(self, grads)
        return backward

    for cls in (Rollout, GraphedRollout):  # eager and graphed rollouts
        monkeypatch.setattr(cls, "backward", flaky(cls.backward))
    scene = small_scene("optimize.line_search.enabled=true", "optimize.iterations=3")
    optimize(scene=scene, assets=build_assets(scene), out_dir=tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [0, 1, 2]
    assert lines[0]["accepted"] and not lines[1]["accepted"] and lines[1]["grad_norm"] is None
    assert "back to the previous parameters" in lines[1]["line_search_note"]
    assert lines[2]["loss"] == pytest.approx(lines[0]["loss"], rel=1e-6)  # iteration 0's parameters again
    assert all(lines[2]["lr"][k] < lines[0]["lr"][k] for k in lines[0]["lr"])

    calls.clear()
    for cls in (Rollout, GraphedRollout):
        monkeypatch.setattr(cls, "backward", lambda self, grads: (_ for _ in ()).throw(
            SimulationError("non-finite gradient in the MPM backward pass")))
    args = ["optimize", str(SCENE), "--out", str(tmp_path / "fails"), *sum((["--set", s] for s in SMALL), []),
            "--set", "optimize.line_search.enabled=true"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "iteration 0: non-finite gradient in the MPM backward pass" in result.output


def test_one_param_spec_per_learn_section_and_one_loss_term_per_weight():
    """params.py's table names every learn.<key> section once (and nothing else), in the schema's order (the optimiser's
    group order, which checkpoints hold); LOSS_TERMS names every weight of scene.loss."""
    from diffmpm_cli.config.schema import LearnConfig, LossConfig
    from diffmpm_cli.losses import LOSS_TERMS
    from diffmpm_cli.params import PARAMS

    assert [spec.key for spec in PARAMS] == list(LearnConfig.model_fields)
    assert set(LOSS_TERMS) == {k for k in LossConfig.model_fields if k != "silhouette_kind"}


def test_param_specs_map_defaults_summary_and_projection_consistently():
    """Every group starts at its natural default through its own transform, is reported in natural units under its
    learn key, and is projected into its bounds."""
    import math

    from diffmpm_cli.params import BY_GROUP, BY_KEY, reported

    scene = small_scene("learn.E.init=3000", "learn.opacity.init=0.25", "appearance.sigma0=0.01")
    assets = build_assets(scene)
    from diffmpm_cli.pipeline import Pipeline

    pipe = Pipeline(scene, assets)
    params = pipe.initial_parameters(["log_E", "nu", "opacity_logit", "log_sigma0", "color"])
    assert float(params["log_E"]) == pytest.approx(math.log(3000.0))
    assert float(params["opacity_logit"]) == pytest.approx(math.log(0.25 / 0.75))
    assert float(params["log_sigma0"]) == pytest.approx(math.log(0.01))
    learned = reported(params)
    assert learned["E"] == pytest.approx(3000.0, rel=1e-6) and learned["opacity"] == pytest.approx(0.25, rel=1e-6)
    assert learned["sigma0"] == pytest.approx(0.01, rel=1e-6) and learned["nu"] == pytest.approx(scene.material.nu)
    assert BY_KEY["E"].group == "log_E" and BY_GROUP["opacity_logit"].key == "opacity"
    nu, color = torch.tensor(0.7), torch.tensor([-1.0, 0.5, 2.0])
    BY_GROUP["nu"].project_(nu)
    BY_GROUP["color"].project_(color)
    assert float(nu) == pytest.approx(0.49) and color.tolist() == [0.0, 0.5, 1.0]


def test_the_pipeline_keeps_no_state_between_calls():
    """What varies (start state, kept frames, cut-offs) is an argument: calls with them leave the next call as it was."""
    from diffmpm_cli.pipeline import Pipeline
    from diffmpm_cli.render.rasterize import RasterCutoffs

    scene = small_scene()
    pipe = Pipeline(scene, build_assets(scene))
    before = vars(pipe).copy()
    with torch.no_grad():
        plain = pipe.forward({})
        start = {k: getattr(plain.result, k)[-1] for k in ("x", "F", "C")}
        start["v"] = torch.full_like(plain.result.v[-1], 0.2)  # moving: the state at step 20 is somewhere else
        moved = pipe.forward({}, start=start, frames=[5], cutoffs=RasterCutoffs.smooth())
        again = pipe.forward({})
    assert moved.result.frames == [5, 20] and plain.result.frames == again.result.frames == [10, 20]
    assert not torch.equal(moved.result.x[-1], plain.result.x[-1])
    assert torch.equal(again.images, plain.images) and torch.equal(again.result.x, plain.result.x)
    assert vars(pipe).keys() == before.keys() and all(vars(pipe)[k] is v for k, v in before.items())


def test_read_history_drops_only_a_torn_last_line(tmp_path):
    from diffmpm_cli.errors import CheckpointError
    from diffmpm_cli.optimize.run import _read_history

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"iteration": 0, "loss": 1.0}\n{"iteration": 1, "loss": 0.5}\n{"iteration": 2, "lo')
    assert [r["iteration"] for r in _read_history(log, 5)] == [0, 1]
    assert [r["iteration"] for r in _read_history(log, 1)] == [0]
    log.write_text('{"iteration": 0, "loss": 1.0}\nnot json\n{"iteration": 2, "loss": 0.5}\n')
    with pytest.raises(CheckpointError, match="line 2"):
        _read_history(log, 5)


def test_a_run_sets_the_process_state_back(tmp_path):
    """The seed and (on the CPU) the thread count a run sets hold only while it runs."""
    threads = torch.get_num_threads()
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    scene = small_scene("optimize.iterations=1", "output.turntable_frames=0")
    optimize(scene=scene, assets=build_assets(scene), out_dir=tmp_path / "run")
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.rand(3), expected)
