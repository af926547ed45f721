"""Fuzz corpus (issue #12): more than 500 malformed scenes and options, each refused with exit 2 and one
`error: ...` line on stderr (no traceback, no warning before it), nothing written, within 10 s.

Two parts: a hand-written list covering every input finding of the issue, and hypothesis-generated mutations of
the shipped scenes (a wrong type, a non-finite number, an unknown key, a refused YAML construct or a bad key
path in --set; each mutation makes a scene invalid whatever the rest holds). Everything runs in-process through
Typer's CliRunner on `diffmpm validate` (a few on `optimize --iters 0`); hypothesis is derandomized, so CI sees
the same examples every time.
"""

from __future__ import annotations

import copy
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from conftest import BASE_SCENE, REPO, SCENES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_hardening import ALIAS_BOMB, bomb_png, corrupt_png
from typer.testing import CliRunner

from diffmpm_cli.cli import app
from diffmpm_cli.config.load import parse_yaml

runner = CliRunner()
SNOWMAN = REPO / "scenes" / "sphere_to_snowman.yaml"
CASE_SECONDS = 10.0
HYPOTHESIS_EXAMPLES = 460


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def run_refused(args, cwd: Path) -> None:
    """Run the CLI in ``cwd``; it must refuse with exit 2 and one error line, in time, and write nothing there."""
    before = listing(cwd)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        start = time.perf_counter()
        result = runner.invoke(app, [str(a) for a in args])
        seconds = time.perf_counter() - start
    finally:
        os.chdir(old)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (args, result.exit_code, result.stderr, repr(result.exception))
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert seconds <= CASE_SECONDS, (args, seconds)
    assert listing(cwd) == before, (args, "wrote", set(listing(cwd)) - set(before))


def absolute_paths(node, base: Path):
    """A scene's `path:` values made absolute, so that a mutated copy written elsewhere still finds its files."""
    if isinstance(node, dict):
        return {k: str((base / v).resolve()) if k == "path" and isinstance(v, str) else absolute_paths(v, base)
                for k, v in node.items()}
    if isinstance(node, list):
        return [absolute_paths(v, base) for v in node]
    return node


SHIPPED = {p.stem: absolute_paths(parse_yaml(p.read_text()), p.parent) for p in SCENES}


# ---------------------------------------------------------------------------------------------------------------
# the hand-written corpus: every finding of the issue and its neighbours


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Files the hand-written cases name (scenes, pictures, special files), in a folder of their own."""
    d = tmp_path_factory.mktemp("corpus")
    text = SNOWMAN.read_text()
    files = {
        "bomb.yaml": ALIAS_BOMB,
        "deep.yaml": "x: " + "[" * 3000 + "]" * 3000 + "\n",
        "deep_map.yaml": "x: " + "{a: " * 200 + "1" + "}" * 200 + "\n",
        "recursive.yaml": text + "loop: &l [*l]\n",
        "complex_key.yaml": text + "? [a, b]\n: 1\n",
        "complex_key_flow.yaml": text.replace("name: sphere_to_snowman", "name: {? [a, b]: 1}"),
        "big_int.yaml": text.replace("seed: 0", "seed: " + "7" * 5000),
        "octal.yaml": text.replace("steps: 30", "steps: 010"),
        "sexagesimal.yaml": text.replace("steps: 30", "steps: 1:00"),
        "yes.yaml": text.replace("dFc: {enabled: true", "dFc: {enabled: yes"),
        "true_number.yaml": text.replace("dt: 2.0e-3", "dt: true"),
        "set_vector.yaml": text.replace("gravity: [0.0, 0.0, 0.0]", "gravity: !!set {0, 1, 2}"),
        "timestamp.yaml": text.replace("name: sphere_to_snowman", "name: !!timestamp 2001-12-14"),
        "binary.yaml": text.replace("name: sphere_to_snowman", "name: !!binary aGVsbG8="),
        "python_tag.yaml": text.replace("name: sphere_to_snowman", "name: !!python/object:os.system {}"),
        "bad_merge.yaml": text.replace("sim:\n", "sim:\n  <<: 5\n", 1),
        "merge_dup.yaml": text.replace("sim:\n", "sim:\n  <<: {dt: 5.0e-4}\n  steps: 10\n", 1),
        "merge_unknown.yaml": text.replace("sim:\n", "sim:\n  <<: {dtt: 5.0e-4}\n", 1),
        "dup_key.yaml": text + "sim: {}\n",
        "truth_empty.yaml": text.replace("target:\n", "target:\n  truth: {}\n", 1),
        "two_docs.yaml": text + "---\nname: again\n",
        "empty.yaml": "",
        "comment_only.yaml": "# nothing\n",
        "list.yaml": "- source\n- target\n",
        "scalar.yaml": "42\n",
        "tab.yaml": "name:\tx\nsource:\n\t- 1\n",
        "unclosed.yaml": "sim: {dt: 1e-3\n",
        "undefined_alias.yaml": text + "x: *nowhere\n",
        "huge.yaml": text + ("#" * 1000 + "\n") * 1100,
        "not_utf8.yaml": None,
        "nul.yaml": None,
    }
    for name, content in files.items():
        # a case that rewrites a line of the shipped scene must find it (else it would test a valid scene)
        assert content != text, f"{name}: the shipped scene no longer has the line this case rewrites"
        if content is not None:
            (d / name).write_text(content)
    (d / "not_utf8.yaml").write_bytes(b"name: caf\xe9\n")
    (d / "nul.yaml").write_bytes(text.encode() + b"\x00\n")
    os.mkfifo(d / "fifo.yaml")
    os.mkfifo(d / "fifo.obj")
    (d / "loop1.obj").symlink_to(d / "loop2.obj")
    (d / "loop2.obj").symlink_to(d / "loop1.obj")
    (d / "empty.obj").write_text("")
    (d / "garbage.obj").write_bytes(os.urandom(256))
    (d / "sheet.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    corrupt_png(d / "corrupt.png")
    bomb_png(d / "bomb.png")
    bomb_png(d / "big.png", side=9000)
    (d / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    with Image.open(REPO / "scenes" / "images" / "torus_view0.png") as img:  # another aspect than the 32x32 render
        img.crop((0, 0, img.width, img.height * 5 // 8)).save(d / "wrong_size.png")
    (d / "text.png").write_text("not a picture")
    for picture in ("corrupt", "bomb", "big", "garbage", "wrong_size", "text"):
        data = copy.deepcopy(BASE_SCENE)
        data["target"]["images"] = [{"path": f"{picture}.png", "camera": "front"}]
        (d / f"image_{picture}.yaml").write_text(yaml.safe_dump(data))
    for mesh in ("loop1.obj", "fifo.obj", "empty.obj", "garbage.obj", "sheet.obj", "missing.obj", "a\0b.obj",
                 "m" * 300 + ".obj", ".", "/dev/zero", "scene.txt"):
        data = copy.deepcopy(BASE_SCENE)
        data["source"] = {"shape": "mesh", "path": mesh, "size": 0.3}
        (d / f"mesh_{len(list(d.glob('mesh_*')))}.yaml").write_text(yaml.safe_dump(data))
    (d / "base.yaml").write_text(yaml.safe_dump(BASE_SCENE))
    (d / "a_file").write_text("mine")
    return d


def _set(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


HAND_SETS = [  # --set overrides on the shipped default scene, each refused
    "name={? [a, b]: 1}", "sim.dt=!!float abc", "sim.dt=!!bool maybe", "sim.gravity=!!map [1]", "sim.gravity=!!seq {a: 1}",
    "name=!!str [1]", "sim.dt=!!int 1.5", f"sim.steps={'9' * 5000}", f"sim.dt=1.{'0' * 100}", "sim.steps=010",
    "sim.steps=-0012", "sim.steps=1:30", "sim.dt=true", "sim.steps=true", "sim.dt='1e-3'", "learn.dFc.enabled=1",
    "learn.dFc.enabled=yes", "learn.dFc.enabled=on", "sim.gravity=!!set {1, 2, 3}", "target.truth={}",
    "target.truth={E: null}", f"optimize.seed={2**63}", "optimize.seed=-1", "optimize.seed=1e300", "sim.dt=.nan",
    "sim.dt=.inf", "sim.dt=-.inf", "sim.dt=1e309", "material.density=1e300", "material.density=1e-300",
    "material.E=1e300", "material.nu=0.5", "material.nu=true", "material.preset=steel",
    "sim.domain={lower: [-1e308, -1e308, -1e308], upper: [1e308, 1e308, 1e308]}",
    "sim.domain={lower: [-1e300, -1e300, -1e300], upper: [1e300, 1e300, 1e300]}",
    "sim.domain={lower: [0, 0, 0], upper: [1e-300, 1e-300, 1e-300]}",
    "source={shape: capsule, radius: 1e-9, height: 0.1}", "source={shape: cylinder, radius: 1e-7, height: 1e-7}",
    "source={shape: torus, major_radius: 1e-9, minor_radius: 1e-10}", "source={shape: sphere, radius: 1e-300}",
    "source={shape: sphere, radius: 1e200}", "source={shape: box, size: [1e200, 1e200, 1e200]}",
    "source={shape: union, parts: [{shape: sphere, radius: 1e-300}]}", "source.scale=1e300",
    "source.center=[1e308, 1e308, 1e308]", "source={shape: cube}", "source={shape: union, parts: []}",
    "source={shape: difference, parts: [{shape: sphere, radius: 0.1}]}",
    "render.cameras[0].fov=5e-324", "render.cameras[0].fov=180", "render.cameras[0].radius=1e-12",
    "render.cameras[0].elevation=89.99999999", "render.cameras[0].up=[1e308, 1e308, 1e308]",
    "render.cameras[0].up=[0, 0, 0]", "render.cameras[0].target=[1e200, 1e200, 1e200]",
    "render.cameras=[{type: pinhole, name: p, fov: 30, eye: [0.5, 0.5, 0.5], target: [0.5, 0.5, 0.5]}]",
    "render.cameras=[{type: pinhole, name: p, fov: 30, K: [[1, 0, 0], [0, 1, 0], [0, 0, 1]], eye: [0.5, 0.5, 2]}]",
    "render.cameras=[]", "render.cameras[7].fov=30", "render.cameras[99999999999999999999].fov=30",
    "sim.floor={enabled: true, normal: [1e308, 1e308, 0], height: -1}", "sim.floor={enabled: true, normal: [0, 0, 0]}",
    "sim.dx=0.03", "sim.grid_resolution=1e300", "output.dir=''", "output.dir=~/x", "output.dir=a/../../x",
    "sim.dt='[bold]x[/bold] [/]'", "name=[/x]", "output.dir=/etc", "output.dir=../x",
    "sim.dtt=1", "sim.dt.x=1", "sim[0]=1", "a..b=1", "=1", "sim.dt", "sim.dt=[1", "sim.dt={a: 1, a: 2}",
    "sim.dt=*undefined", "sim.dt=&a [*a]", "sim.dt=%YAML 1.1", "sim.dt=\t1",
]


def hand_cases() -> list[tuple[str, list]]:
    """(id, arguments) of the hand-written corpus; paths are relative to the corpus folder (see ``corpus``)."""
    cases: list[tuple[str, list]] = []
    files = ["bomb", "deep", "deep_map", "recursive", "complex_key", "complex_key_flow", "big_int", "octal",
             "sexagesimal", "yes", "true_number", "set_vector", "timestamp", "binary", "python_tag", "bad_merge",
             "merge_dup", "merge_unknown", "dup_key", "truth_empty", "two_docs", "empty", "comment_only", "list",
             "scalar", "tab", "unclosed", "undefined_alias", "huge", "not_utf8", "nul", "fifo"]
    cases += [(f"file {name}", ["validate", f"{name}.yaml"]) for name in files]
    cases += [("dev zero", ["validate", "/dev/zero"]), ("folder", ["validate", "."]),
              ("missing", ["validate", "absent.yaml"]), ("NUL path", ["validate", "a\0b.yaml"]),
              ("long path", ["validate", "s" * 300 + ".yaml"])]
    cases += [(f"image {p}", ["validate", f"image_{p}.yaml"])
              for p in ("corrupt", "bomb", "big", "garbage", "wrong_size", "text")]
    cases += [(f"mesh {i}", ["validate", f"mesh_{i}.yaml"]) for i in range(11)]
    cases += [(f"set {item[:40]}", ["validate", SNOWMAN, *_set(item)]) for item in HAND_SETS]
    cases += [
        ("lattice before count", ["validate", SNOWMAN, *_set("sim.grid_resolution=512", "sim.particles_per_cell=6")]),
        ("preview onto a file", ["validate", "base.yaml", "--preview", "a_file"]),
        ("preview under a file", ["validate", "base.yaml", "--preview", "a_file/sub"]),
        ("preview of an unstable scene", ["validate", "base.yaml", "--preview", "pv", *_set("sim.dt=0.05")]),
        ("preview of a bad scene", ["validate", "bomb.yaml", "--preview", "pv"]),
        ("usage unknown option", ["validate", SNOWMAN, "--foo"]),
        ("usage missing argument", ["validate"]),
        ("usage unknown command", ["frobnicate"]),
        ("usage bad option value", ["optimize", SNOWMAN, "--iters", "-1"]),
        ("usage subcommand option", ["bench", "mpm", "--nope"]),
        ("usage two scenes", ["validate", SNOWMAN, SNOWMAN]),
        ("render frames markup", ["render", "base.yaml", "--frames", "[/x]"]),
        ("render frames huge", ["render", "base.yaml", "--frames", "9" * 5000]),
        ("render bad format", ["render", "base.yaml", "--format", "[bold]x"]),
        ("optimize bomb", ["optimize", "bomb.yaml", "--iters", "0"]),
        ("optimize corrupt picture", ["optimize", "image_corrupt.yaml", "--iters", "0"]),
        ("optimize seed", ["optimize", SNOWMAN, "--iters", "0", *_set(f"optimize.seed={2**63}")]),
        ("optimize lattice", ["optimize", SNOWMAN, "--iters", "0", "--out", "run",
                              *_set("sim.grid_resolution=512", "sim.particles_per_cell=6")]),
        ("optimize truth", ["optimize", "truth_empty.yaml", "--iters", "0", "--out", "run"]),
        ("optimize unstable", ["optimize", "base.yaml", "--iters", "0", *_set("sim.dt=0.05")]),
        ("check-grad seed", ["check-grad", "base.yaml", "--seed", str(2**63)]),
    ]
    return cases


HAND = hand_cases()


@pytest.mark.parametrize("args", [args for _, args in HAND], ids=[name for name, _ in HAND])
def test_hand_written_corpus_is_refused(corpus, args):
    run_refused(args, corpus)


# ---------------------------------------------------------------------------------------------------------------
# hypothesis: mutations of the shipped scenes

WRONG_FOR_NUMBER = ["abc", True, [1.5], {"k": 1.0}]
WRONG_FOR_TEXT = [1.5, True, [1.5], {"k": 1.0}]
WRONG_FOR_BOOL = [1.5, "abc", [True], {"k": 1.0}]
WRONG_FOR_CONTAINER = [1.5, "abc", True]
NON_FINITE = [float("nan"), float("inf"), float("-inf")]
REFUSED_YAML = ["!!set {1, 2}", "0755", "[1", "{? [a]: 1}", "!!float x", "!!binary aGk=", "&a [*a]", "*nope",
                "1" * 50, "!!timestamp 2001-01-01", "{a: 1, a: 2}", "!!map [1]", "!!python/name:os.system", "'a"]


def nodes(node, path=()):
    """(path, value) of every node below the root."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path + (key,), value
            yield from nodes(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield path + (i,), value
            yield from nodes(value, path + (i,))


def key_path(path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(path))


def set_at(data, path, value):
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


@st.composite
def malformed(draw):
    """(scene name, mutated scene dict or None, extra CLI arguments): one mutation that makes any scene invalid."""
    name = draw(st.sampled_from(sorted(SHIPPED)))
    data = copy.deepcopy(SHIPPED[name])
    path, value = draw(st.sampled_from(list(nodes(data))))
    kind = draw(st.sampled_from(["wrong type", "non-finite", "unknown key", "yaml in --set", "unknown --set key"]))
    if kind == "non-finite" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        kind = "wrong type"
    if kind == "unknown key" and not isinstance(value, dict):
        kind = "wrong type"
    if kind == "wrong type":
        wrong = (WRONG_FOR_BOOL if isinstance(value, bool) else WRONG_FOR_NUMBER if isinstance(value, (int, float))
                 else WRONG_FOR_TEXT if isinstance(value, str) else WRONG_FOR_CONTAINER)
        set_at(data, path, draw(st.sampled_from(wrong)))
        return name, data, []
    if kind == "non-finite":
        set_at(data, path, draw(st.sampled_from(NON_FINITE)))
        return name, data, []
    if kind == "unknown key":
        value["zz_" + draw(st.text("abcdefghij", min_size=1, max_size=6))] = 1.0
        return name, data, []
    if kind == "yaml in --set":
        return name, data, ["--set", f"{key_path(path)}={draw(st.sampled_from(REFUSED_YAML))}"]
    return name, data, ["--set", f"{key_path(path)}.zz_{draw(st.text('abcdefghij', min_size=1, max_size=6))}=1"]


@settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=timedelta(seconds=CASE_SECONDS), derandomize=True,
          database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=malformed(), preview=st.booleans())
def test_mutated_shipped_scenes_are_refused(tmp_path, case, preview):
    name, data, extra = case
    scene = tmp_path / f"{name}.yaml"
    scene.write_text(yaml.safe_dump(data, sort_keys=False))
    args = ["validate", scene, *extra] + (["--preview", "preview"] if preview else [])
    run_refused(args, tmp_path)
