"""Progress of a TensorRT engine build (builds take minutes), printed phase by phase."""
from __future__ import annotations

import threading
import time
from typing import Callable


class BuildProgress:
    """Prints TensorRT builder phases with their duration.

    Phases nest (``parent_phase``); only the top ``max_depth`` levels are printed, and steps of a
    printed phase at most every ``step_interval_s`` seconds.  Thread-safe: TensorRT calls it
    from its own threads.  Pure: :func:`progress_monitor` wraps it in a ``trt.IProgressMonitor``.
    """

    def __init__(self, printer: Callable[[str], None] = print, max_depth: int = 2, step_interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.printer = printer
        self.max_depth = max_depth
        self.step_interval_s = step_interval_s
        self.clock = clock
        self._lock = threading.Lock()
        self._phases: dict[str, tuple[int, int, float, float]] = {}  # name -> depth, steps, start, last print

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        with self._lock:
            depth = self._phases[parent_phase][0] + 1 if parent_phase in self._phases else 0
            now = self.clock()
            self._phases[phase_name] = (depth, num_steps, now, now)
            if depth < self.max_depth:
                self.printer(f"{'  ' * depth}[trt] {phase_name} ({num_steps} steps)")

    def step_complete(self, phase_name: str, step: int) -> bool:
        with self._lock:
            if phase_name in self._phases:
                depth, steps, start, last = self._phases[phase_name]
                now = self.clock()
                if depth < self.max_depth and now - last >= self.step_interval_s:
                    self.printer(f"{'  ' * depth}[trt] {phase_name}: {step + 1}/{steps}, {now - start:.0f} s")
                    self._phases[phase_name] = (depth, steps, start, now)
        return True  # False would cancel the build

    def phase_finish(self, phase_name: str) -> None:
        with self._lock:
            depth, _, start, _ = self._phases.pop(phase_name, (0, 0, self.clock(), 0.0))
            if depth < self.max_depth:
                self.printer(f"{'  ' * depth}[trt] {phase_name} done in {self.clock() - start:.1f} s")


def progress_monitor(trt, progress: BuildProgress):
    """A ``trt.IProgressMonitor`` forwarding to ``progress`` (TensorRT >= 10)."""

    class ProgressMonitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            return progress.step_complete(phase_name, step)

        def phase_finish(self, phase_name):
            progress.phase_finish(phase_name)

    return ProgressMonitor()
