"""The hooks through which behaviour is added to a run without touching the loop.

A callback subclasses ``Callback`` and overrides the hooks it needs; the loop (runner/engine/
loop.py) calls them on every process, in the order of the ``callbacks`` config. Each hook gets
the job's ``Trainer``: read its ``state`` (epoch, step, ...), ``settings`` (trainer.*), ``family``
(the model and loss), ``run_dir`` (None on processes other than rank 0, which write no files),
and ask it for things: ``trainer.request_stop(reason)``, ``trainer.save_checkpoint(name)``,
``trainer.say(text)`` (a line on the terminal and in run.log).

* ``on_fit_start(trainer)``: before the first step (also of a resumed run).
* ``on_train_steps(trainer, steps, row)``: after each optimizer window (``steps`` optimizer
  steps: 1, or trainer.steps_per_graph launched at once). ``row`` is the training row of a
  logging point (``loss``, ``lr``, ``<unit>_per_s``: the loss is read from the device there only),
  else None: listening costs no host sync.
* ``on_validation_end(trainer, metrics)``: after each validation, before its row is written:
  keys added to ``metrics`` are logged with it, to metrics.jsonl and every logger.
* ``on_epoch_end(trainer)``: after each epoch (and its validation).
* ``on_save_checkpoint(trainer, payload)``: before a checkpoint is written (the payload may be
  added to); ``on_checkpoint_saved(trainer, path)`` after. A callback's own ``state_dict()`` is
  stored in every checkpoint and given back to ``load_state_dict`` when ``resume=`` continues.
* ``on_fit_end(trainer)``: the job's training is done (its last step, or a stop).
* ``on_interrupt(trainer, signum)``: SIGINT or SIGTERM, once the current step is done.
* ``on_exception(trainer, error)``: training failed; the run then records the failure.
* ``on_message(trainer, text)``: a line for the terminal (a validation's metrics, early stopping).
* ``on_run_end(trainer, status)``: the run is over (after its test evaluation): ``completed``,
  ``failed`` or ``interrupted``, as summary.json is about to say.

A stop asked for by ``request_stop`` ends training after the current window; under DDP every
rank stops at the same step: one asked for in ``on_validation_end`` or at a logging point is
agreed there at once, one asked for at another step at the next stop vote (runner/engine/
signals.py). In a fused group (hydra/launcher=fused) each job has its own callbacks, which see
that job alone. Built-in callbacks (runner/callbacks/): checkpoints, early_stopping, progress,
plots; for debugging: profiler, anomaly.
"""
from __future__ import annotations

from typing import Any

HOOKS = ("on_fit_start", "on_train_steps", "on_validation_end", "on_epoch_end", "on_save_checkpoint",
         "on_checkpoint_saved", "on_fit_end", "on_interrupt", "on_exception", "on_message", "on_run_end")


class Callback:
    """Override the hooks you need (see the module docstring); the others cost nothing."""

    # One instance drives the whole process (a terminal display): in a fused group only the first
    # job's runs, and it sees the group's steps.
    one_per_process = False

    def on_fit_start(self, trainer: Any) -> None: ...

    def on_train_steps(self, trainer: Any, steps: int, row: dict[str, Any] | None) -> None: ...

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None: ...

    def on_epoch_end(self, trainer: Any) -> None: ...

    def on_save_checkpoint(self, trainer: Any, payload: dict[str, Any]) -> None: ...

    def on_checkpoint_saved(self, trainer: Any, path: Any) -> None: ...

    def on_fit_end(self, trainer: Any) -> None: ...

    def on_interrupt(self, trainer: Any, signum: int) -> None: ...

    def on_exception(self, trainer: Any, error: BaseException) -> None: ...

    def on_message(self, trainer: Any, text: str) -> None: ...

    def on_run_end(self, trainer: Any, status: str) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """State that resume= must restore (tensors, numbers, strings and containers of them)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Callbacks:
    """A job's callbacks by name, each hook called on those that override it: a hook nobody
    overrides is an empty loop (the captured step's path stays as fast as without callbacks)."""

    def __init__(self, named: dict[str, Callback]):
        self.named = dict(named)
        self.listening = {hook: [cb for cb in self.named.values() if overrides(cb, hook)] for hook in HOOKS}

    def call(self, hook: str, *args: Any) -> None:
        for callback in self.listening[hook]:
            getattr(callback, hook)(*args)

    def sharing(self, first: "Callbacks") -> "Callbacks":
        """These callbacks, with ``first``'s instance in place of each ``one_per_process`` one (a
        fused group's jobs share the first job's display)."""
        return Callbacks({name: first.named[name] if cb.one_per_process and name in first.named else cb
                          for name, cb in self.named.items()})

    def state_dict(self) -> dict[str, Any]:
        return {name: cb.state_dict() for name, cb in self.named.items()}

    def load_state_dict(self, states: dict[str, Any]) -> None:
        for name, cb in self.named.items():
            if name in states:
                cb.load_state_dict(states[name])


def overrides(callback: Callback, hook: str) -> bool:
    return getattr(type(callback), hook) is not getattr(Callback, hook)
