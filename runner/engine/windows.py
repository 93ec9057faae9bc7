"""What each optimizer step trains on: an epoch's batches from the resume point, cut into windows.

A ``Window`` is the work of one optimizer step: the micro-batches of accumulate_grad_batches
(exact accumulation: the last window of an epoch may be shorter, its last batch smaller), or the
stacked batches of several captured steps launched at once (trainer.steps_per_graph). The data
order is runner/engine/data.py's: seeded by (seed, epoch), the same under any number of processes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from runner.config import TrainerConfig
from runner.engine import data as loaders
from runner.engine.devices import DeviceContext
from runner.engine.family import DataBundle


@dataclass
class Window:
    """The work of one optimizer step: ``micro_batches`` yields (batch, weight, is_last) for an
    eager or single captured step; ``stacked`` holds the batches of ``steps`` captured steps
    launched at once."""

    micro_batches: Iterator[tuple[Any, int, bool]] | None = None
    stacked: Any = None
    steps: int = 1


class TrainBatches:
    """One job's training batches: how many an epoch has, and its windows from a loop position."""

    def __init__(self, bundle: DataBundle, settings: TrainerConfig, ctx: DeviceContext):
        self.bundle, self.settings, self.ctx = bundle, settings, ctx
        # trainer.overfit_batches: the same first batches of one order every epoch, unaugmented
        self.overfit = settings.overfit_batches > 0
        self.train = loaders.unaugmented(bundle.train) if self.overfit else bundle.train
        self.on_device = loaders.resident(self.train, ctx.device) if settings.data_on_device else None
        # Resident batches are cut on the device already: nothing to move on the per-step path.
        self.move = ((lambda batch: batch) if self.on_device is not None
                     else loaders.batch_mover(self.train, ctx.to_device, ctx.device))
        self.per_epoch = loaders.limited(loaders.train_batches_per_epoch(
            self.train, settings.batch_size, ctx.world_size, bundle.prebatched), settings.limit_train_batches)
        self.accumulate = int(settings.accumulate_grad_batches)
        self.launch = int(settings.steps_per_graph)  # > 1 only with data_on_device (runner/config/rules.py)
        self.steps_per_epoch = math.ceil(self.per_epoch / self.accumulate)

    def windows(self, state: Any, launch_size: Callable[[int], int]) -> Iterator[Window]:
        """This epoch's optimizer steps from ``state``'s position (epoch, batch_in_epoch, which
        this advances). ``launch_size(n)``: how many captured steps to launch at once when ``n``
        whole batches are left in the epoch (1: a step alone)."""
        batches = iter(self.epoch(state.epoch, state.batch_in_epoch))
        previous: list[Any] = [None]
        while state.batch_in_epoch < self.per_epoch:
            n = 1 if self.launch == 1 else launch_size(
                min(batches.full_batches_left(), self.per_epoch - state.batch_in_epoch))
            if n > 1:
                state.batch_in_epoch += n
                yield Window(stacked=batches.take(n), steps=n)
                continue
            start = state.batch_in_epoch
            end = min((start // self.accumulate + 1) * self.accumulate, self.per_epoch)
            yield Window(micro_batches=self.micro_batches(batches, end - start, previous, state))

    def micro_batches(self, batches: Iterator[Any], count: int, previous: list[Any],
                      state: Any) -> Iterator[tuple[Any, int, bool]]:
        for j in range(count):
            batch = next(batches, None)
            # Shards differ by at most one sample, so a process may run out one batch early: it
            # repeats its last batch with weight 0, taking part in DDP's gradient all-reduce
            # without adding anything to it.
            weight = 0 if batch is None else 1
            batch = previous[0] if batch is None else self.move(batch)
            previous[0] = batch
            state.batch_in_epoch += 1
            yield batch, weight, j == count - 1

    def epoch(self, epoch: int, skip_batches: int) -> Any:
        t, ctx = self.settings, self.ctx
        common = dict(batch_size=t.batch_size, epoch=0 if self.overfit else epoch, seed=t.seed, rank=ctx.rank,
                      world=ctx.world_size, weights=self.bundle.train_weights, skip_batches=skip_batches)
        if self.on_device is not None:
            return self.on_device.epoch(**common)
        return loaders.train_loader(self.train, prebatched=self.bundle.prebatched, num_workers=t.num_workers,
                                    pin=ctx.device.type == "cuda", **common)
