"""``callbacks.profiler`` (debug=profiler): torch.profiler over a few optimizer windows.

The schedule waits ``wait`` windows, warms up for ``warmup`` and records ``active``; then the
trace goes to ``<run>/profiler/trace.json`` (chrome://tracing or https://ui.perfetto.dev) and the
``rows`` most expensive operators (CUDA time on a GPU, CPU time otherwise) are printed and kept in
``<run>/profiler/top_ops.txt``. Only rank 0 profiles.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from runner.callbacks.base import Callback
from runner.runs.files import atomic_write_text


class Profiler(Callback):
    def __init__(self, wait: int = 2, warmup: int = 2, active: int = 6, rows: int = 15):
        self.wait, self.warmup, self.active, self.rows = wait, warmup, active, rows
        self.profiler: Any = None
        self.windows = 0

    def on_fit_start(self, trainer: Any) -> None:
        if not trainer.ctx.is_main:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.ctx.device.type == "cuda" else [])
        self.on_cuda = trainer.ctx.device.type == "cuda"
        self.profiler = profile(activities=activities, record_shapes=True,
                                schedule=schedule(wait=self.wait, warmup=self.warmup, active=self.active, repeat=1))
        self.profiler.start()

    def on_train_steps(self, trainer: Any, steps: int, row: Any) -> None:
        if self.profiler is None:
            return
        self.windows += 1
        self.profiler.step()
        if self.windows == self.wait + self.warmup + self.active:
            self.finish(trainer)

    def on_fit_end(self, trainer: Any) -> None:
        self.finish(trainer)

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        self.finish(trainer)

    def finish(self, trainer: Any) -> None:
        if self.profiler is None:
            return
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        recorded = self.windows > self.wait + self.warmup
        if not recorded:
            trainer.say(f"profiler: the run ended after {self.windows} windows, before the "
                        f"{self.wait + self.warmup} of wait and warm-up: nothing recorded")
            return
        sort = "self_cuda_time_total" if self.on_cuda else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort, row_limit=self.rows)
        if trainer.run_dir is not None:
            folder = trainer.run_dir / "profiler"
            folder.mkdir(parents=True, exist_ok=True)
            profiler.export_chrome_trace(str(folder / "trace.json"))
            atomic_write_text(folder / "top_ops.txt", table)
            trainer.say(f"profiler: {min(self.windows - self.wait - self.warmup, self.active)} windows recorded; "
                        f"trace in {folder / 'trace.json'}")
        print(table, flush=True)
