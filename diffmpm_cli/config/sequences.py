"""Picture sequences and videos as targets: which simulation step each picture shows (values only, no files).

Picture k of a sequence shows time ``start + k / fps``; it is compared with the nearest simulation step
``round(t / sim.dt)`` (at most dt / 2 off). The pictures whose time lies inside the simulated time
``sim.steps x sim.dt`` are used; their steps are kept by the rollout without being listed in ``sim.frames``.
"""

from __future__ import annotations

import math

from ..errors import ConfigError

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")


def is_video(path: str) -> bool:
    return path.lower().endswith(VIDEO_SUFFIXES)


def sequence_steps(scene, index: int) -> list[int]:
    """The simulation steps pictures 0, 1, ... of target.sequences[index] show (increasing, each step once);
    ConfigError when two pictures would share a step (fps above 1 / sim.dt) or none falls in the simulated time."""
    sequence, sim = scene.target.sequences[index], scene.sim
    key = f"target.sequences[{index}]"
    per_picture = 1.0 / (sequence.fps * sim.dt)  # steps between pictures
    if per_picture < 1.0 - 1e-9:
        raise ConfigError(f"{key}.fps", f"{sequence.fps:g} pictures/s is faster than the simulation's steps "
                                        f"(1 / sim.dt = {1 / sim.dt:g} per s): two pictures would show one step")
    duration = sim.steps * sim.dt
    if sequence.start > duration * (1 + 1e-9):
        raise ConfigError(f"{key}.start", f"{sequence.start:g} s is after the simulated time ({duration:g} s)")
    count = math.floor((duration - sequence.start) * sequence.fps * (1 + 1e-9)) + 1
    return [min(sim.steps, round((sequence.start + k / sequence.fps) / sim.dt)) for k in range(count)]


def target_steps(scene) -> list[int]:
    """Every step some target sequence shows, sorted."""
    steps: set[int] = set()
    for index in range(len(scene.target.sequences)):
        steps.update(sequence_steps(scene, index))
    return sorted(steps)


def rollout_steps(scene) -> tuple[int, ...]:
    """The steps a rollout keeps besides the final one: sim.frames and the steps of the target sequences."""
    return tuple(sorted(set(scene.sim.frames) | set(target_steps(scene))))
