"""Where a training run's wall time goes: a lap timer for the training loop and the milestones of
its start-up, both off unless ``LSTMGEN_STEP_TIMES`` is set (``bench/step_time.py`` sets it).

``LSTMGEN_STEP_TIMES=N`` makes every worker time its loop from step N on: each ``lap(part)`` adds
the time since the previous lap to ``part``, so the parts add up to the wall time of the steps
timed, and at the end each worker prints one ``step_times {json}`` line. ``N,wall`` times the
steps' wall time alone (no laps, no hook: the loop runs as it does untimed). On a GPU each lap first
waits for the device (a kernel's time belongs to the part that launched it); that wait changes
the overlap it measures, so the step rate of a timed run is reported beside the breakdown, and an
untimed run gives the step rate a user gets.

Start-up: the driver and rank 0 note when each stage of ``lstmgen train`` was reached (``mark``);
rank 0 prints them as one ``startup {json}`` line after its first step, in seconds since the
command's process started.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads while Ray starts (runtime.init_ray): not at this module's import
    import torch

ENV = "LSTMGEN_STEP_TIMES"


def process_started() -> float:
    """When this process started (Unix seconds), from the kernel's own record."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001  (no psutil record: the import of this module is close enough)
        return _IMPORTED


_IMPORTED = time.time()
_milestones: dict[str, float] = {}  # stage -> Unix seconds, this process's


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def mark(name: str, at: float | None = None) -> None:
    """Note that start-up reached ``name`` now (or ``at``, Unix seconds)."""
    if enabled():
        _milestones.setdefault("start", process_started())
        _milestones[name] = time.time() if at is None else at


def milestones() -> dict[str, float]:
    """The milestones so far: the driver hands its own to the workers (``adopt``)."""
    return dict(_milestones)


def adopt(driver: dict[str, float]) -> None:
    """Take the driver's milestones (the same clock: embedded Ray runs on one machine)."""
    _milestones.update(driver)


def print_startup() -> None:
    """One ``startup`` line: each stage in seconds since the command started, in order."""
    if enabled() and "start" in _milestones:
        start = _milestones["start"]
        stages = sorted((t - start, name) for name, t in _milestones.items() if name != "start")
        print("startup " + json.dumps({name: round(t, 3) for t, name in stages}), flush=True)


class StepClock:
    """Lap times of the training loop from step ``ENV`` on, per part; a no-op when off."""

    @property
    def timing(self) -> bool:
        """Every part is lapped (not only the wall time)."""
        return self.from_step >= 0 and self.laps

    def __init__(self, device: torch.device, rank: int) -> None:
        setting = os.environ.get(ENV, "")
        self.from_step = int(setting.split(",")[0] or 0) if setting else -1
        self.laps = not setting.endswith(",wall")
        self.on = False
        self.sync = device.type == "cuda"
        self.rank = rank
        self.parts: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.last = self.started = 0.0

    def step_done(self, step: int) -> None:
        """Called after every step: the clock starts once ``step`` reaches the first timed step."""
        if self.from_step < 0:
            return
        if not self.on and step >= self.from_step:
            self._wait()
            self.on, self.started = True, time.perf_counter()
            self.last = self.started
        elif self.on:
            self.steps += 1

    def lap(self, part: str) -> None:
        """The time since the previous lap belongs to ``part``."""
        if not (self.on and self.laps):
            return
        self._wait()
        now = time.perf_counter()
        self.parts[part] += now - self.last
        self.last = now

    def report(self) -> None:
        """One ``step_times`` line: steps timed, their wall time, and the seconds of each part."""
        if not self.on:
            return
        self.lap("other")
        self._wait()
        wall = time.perf_counter() - self.started
        print("step_times " + json.dumps({"rank": self.rank, "steps": self.steps, "wall_s": round(wall, 4),
                                          "parts": {k: round(v, 4) for k, v in self.parts.items()}}), flush=True)

    def _wait(self) -> None:
        if self.sync:
            import torch

            torch.cuda.synchronize()
