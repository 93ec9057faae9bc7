"""Ctrl-C and SIGTERM: the first asks the loop to stop after the current step (under DDP, after
the step of the next vote, within about half a second; see below): it writes a checkpoint and
exits 130 / 143. A second SIGINT exits at once. After training, in the test evaluation
(``immediate``), there is no step to finish: a signal stops it at once, recorded as interrupted.

Under DDP every rank must stop after the same step, or the one that goes on waits forever in
its next all-reduce; but the launcher's forwarded signal reaches each worker at its own moment.
So the ranks vote, as an async all-reduce on a small CPU (gloo) group: every rank posts whether
it heard a signal, and all act on that vote's result at the same later step, by when it is
complete (no device sync, no wait in the common case). A vote costs ~0.1-0.6 ms of CPU
(benchmarks/stop_vote.py), so the ranks vote about every 0.2 s rather than every step: rank 0
puts the number of steps until the next vote in each vote, and every rank reads the same.
"""
from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist

from runner.engine.slurm import requeue_signals
from runner.errors import Interrupted


class SignalFlag:
    def __init__(self, distributed: bool = False) -> None:
        self.signum: int | None = None
        self._during: str | None = None  # inside immediate(): what a signal interrupts
        self._previous: dict[int, Any] = {}
        self._group = None
        self.join(distributed)
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._until_vote = 1  # calls of agreed() until the next vote; the same on every rank
        self._since_vote = 0
        self._last_vote = time.perf_counter()

    def join(self, distributed: bool) -> None:
        """Vote with the other ranks from now on (once the process group exists: a collective,
        every rank calls it)."""
        if distributed and self._group is None:
            self._group = dist.new_group(backend="gloo")

    def __enter__(self) -> "SignalFlag":
        # SIGUSR2: SLURM's warning before a time limit (--signal=USR2@90, submitit's default): handled
        # as SIGTERM is, and the job is then requeued (runner/engine/slurm.py); submitit's own handler
        # waits meanwhile and is restored on exit.
        for sig in (signal.SIGINT, signal.SIGTERM, *requeue_signals()):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some launchers): no handler
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self._during is not None:
            raise Interrupted(signum, self._during)

    @contextmanager
    def immediate(self, during: str) -> Iterator[None]:
        """Where there is no step to finish and nothing to save (the test evaluation after
        training): a signal, or one that came since the loop last looked, stops at once as
        ``Interrupted``, so the run records it; resume= evaluates again from the last checkpoint."""
        if self.signum is not None:
            raise Interrupted(self.signum, during)
        self._during = during
        try:
            yield
        finally:
            self._during = None

    VOTE_EVERY_S = 0.2
    MAX_STEPS_BETWEEN_VOTES = 100

    def agreed(self, now: bool = False, requested: bool = False) -> tuple[int | None, bool]:
        """(the signal to stop on, whether a callback's stop request is agreed): the same on every
        rank at the same call. ``requested``: this rank's callbacks asked to stop (one process:
        handled by the trainer at once, so only the signal counts). ``now``: decide on the current
        flags (blocking; at epoch ends) rather than an earlier vote's."""
        if self._group is None:
            return self.signum, False
        self._until_vote -= 1
        self._since_vote += 1
        if self._until_vote > 0 and not now:
            return None, False
        decided = None
        if self._pending is not None:
            work, vote = self._pending
            work.wait()
            decided = self._read(vote)
            self._pending = None
        if decided is None or decided == (None, False):
            vote = torch.tensor([self.signum or 0, int(requested), self._steps_until_next_vote()], dtype=torch.int64)
            work = dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
            if now:
                work.wait()
                decided = self._read(vote)
            else:
                self._pending = (work, vote)
        return decided or (None, False)

    def _read(self, vote: torch.Tensor) -> tuple[int | None, bool]:
        self._until_vote = int(vote[2])
        return int(vote[0]) or None, bool(vote[1])

    def _steps_until_next_vote(self) -> int:
        """Rank 0's choice (the others post 0, and the vote takes the maximum): as many steps as
        fill VOTE_EVERY_S at the pace since its last vote."""
        now, steps = time.perf_counter(), self._since_vote
        per_step = (now - self._last_vote) / steps
        self._last_vote, self._since_vote = now, 0
        if dist.get_rank() != 0:
            return 0
        fill = int(self.VOTE_EVERY_S / per_step) if per_step > 0 else self.MAX_STEPS_BETWEEN_VOTES
        return max(1, min(self.MAX_STEPS_BETWEEN_VOTES, fill))

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
