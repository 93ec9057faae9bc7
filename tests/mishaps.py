"""Things that go wrong at a chosen moment, for the tests of what a run leaves behind: callbacks
and a dataset named by ``_target_`` (``+callbacks.x._target_=mishaps.SignalAt``)."""
from __future__ import annotations

import errno
import os
import signal

from runner.callbacks.base import Callback
from runner.families.regression import synthetic


class SignalAt(Callback):
    """Sends this process a signal after optimizer step ``step`` (as a user's Ctrl-C would)."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)):
        self.step, self.signum = step, signum

    def on_train_steps(self, trainer, steps, row):
        if trainer.state.step == self.step:
            os.kill(os.getpid(), self.signum)


class DiskFullAt(Callback):
    """Every checkpoint from step ``step`` on fails as a full disk would."""

    def __init__(self, step: int):
        self.step = step

    def on_save_checkpoint(self, trainer, payload):
        if trainer.state.step >= self.step:
            raise OSError(errno.ENOSPC, "No space left on device", str(trainer.run_dir / "checkpoints"))


def signalled_while_building(**kwargs):
    """The regression data, with a SIGTERM arriving while it is built (the run's start-up)."""
    os.kill(os.getpid(), signal.SIGTERM)
    return synthetic(**kwargs)
