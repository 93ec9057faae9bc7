"""Exceptions that end a run, and the exit code each one means.

0 completed; 1 failed at run time; 2 bad config or bad input; 130 / 143 interrupted by SIGINT / SIGTERM;
140 stopped by SIGUSR2, SLURM's warning before a time limit (checkpointed, and requeued where the job
can be: runner/engine/slurm.py). In general an interrupted run exits 128 + the signal's number.
"""
from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
EXIT_SIGUSR2 = 128 + signal.SIGUSR2  # 140 on Linux


def interrupted_codes() -> tuple[int, ...]:
    """The exit codes of a run stopped by a signal it checkpointed on (SignalFlag's signals)."""
    from runner.engine.slurm import requeue_signals

    return (EXIT_SIGINT, EXIT_SIGTERM, *(128 + s for s in requeue_signals()))


class UserError(Exception):
    """Bad config or bad input: exit 2 with one message that names the key, file, row or option
    and what is allowed, no traceback."""

    def __init__(self, message: str = "") -> None:
        # Raised in a DataLoader worker (an unreadable image), it is raised again in the main
        # process as "Caught UserError in DataLoader worker process N.\nOriginal Traceback ...
        # runner.errors.UserError: <message>": keep the message alone, the one line it was.
        if message.startswith("Caught UserError in DataLoader worker") and "UserError: " in message:
            message = message.rstrip().rpartition("UserError: ")[2]
        super().__init__(message)


class Interrupted(BaseException):
    """SIGINT/SIGTERM arrived: the loop finished its step and wrote a checkpoint, or (``during``
    the test evaluation, after training) the evaluation stopped at once, to be redone on resume.
    A BaseException, as KeyboardInterrupt is: raised from the signal handler wherever the
    evaluation is, it must not be taken for that code's own failure by an ``except Exception``
    on its way out (a checkpoint that "cannot be read", a plot that "failed")."""

    def __init__(self, signum: int, during: str | None = None):
        super().__init__(f"interrupted by {signal.Signals(signum).name}" + (f" during {during}" if during else ""))
        self.signum, self.during = signum, during

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)  # 130 SIGINT, 143 SIGTERM, 140 SIGUSR2


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or Inf (a run-time failure, exit 1)."""


class JobFailed(Exception):
    """A sweep job that did not complete. Hydra's launchers record it with the job, run the
    other jobs of the sweep, and then raise it in the sweep's own process (also for jobs that a
    parallel launcher ran in others): the sweep exits 1, and summary.csv says which jobs failed."""


class SweepInterrupted(BaseException):
    """A sweep job was interrupted by SIGINT or SIGTERM (it wrote its checkpoint). A
    BaseException: Hydra's launchers record a job's Exception and go on to the next job, and an
    interrupted sweep must start no further job."""

    def __init__(self, exit_code: int):
        super().__init__(f"sweep interrupted (exit code {exit_code})")
        self.exit_code = exit_code
