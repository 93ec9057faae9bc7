"""Ctrl-C and SIGTERM: the first asks the loop to stop after the current step (it writes a
checkpoint and exits 130 / 143); a second SIGINT exits at once.

Under DDP every rank must stop after the same step, or the one that goes on waits forever in
its next all-reduce; but the launcher's forwarded signal reaches each worker at its own moment.
So the ranks vote: after each step every rank posts whether it heard a signal, as an async
all-reduce on a small CPU (gloo) group, and acts on the previous step's result, which all ranks
read at the same step and which is complete by then (no device sync, no wait in the common case).
"""
from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as dist


class SignalFlag:
    def __init__(self, distributed: bool = False) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._group = dist.new_group(backend="gloo") if distributed else None  # collective: every rank calls it
        self._pending: tuple[Any, torch.Tensor] | None = None

    def __enter__(self) -> "SignalFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some launchers): no handler
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self, now: bool = False) -> int | None:
        """The signal to stop on, the same on every rank at the same call, or None. ``now``:
        decide on the current flags (blocking; at epoch ends) rather than the previous call's."""
        if self._group is None:
            return self.signum
        decided = None
        if self._pending is not None:
            work, vote = self._pending
            work.wait()
            decided = int(vote.item()) or None
            self._pending = None
        if decided is None:
            vote = torch.tensor([self.signum or 0], dtype=torch.int64)
            work = dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
            if now:
                work.wait()
                decided = int(vote.item()) or None
            else:
                self._pending = (work, vote)
        return decided

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
