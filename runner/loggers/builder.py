"""From the ``logger`` config node (``{name: {_target_: ..., keys}}``) to logger objects.

``check_loggers`` runs with the other config checks, before anything starts: an unknown key, a
wrong type or a logger whose package is missing exits 2 with one line. ``Loggers`` holds the
run's loggers for RunResults: it builds and starts them when the run starts, forwards rows, and
keeps a logger that fails mid-run from failing the run.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Any

from omegaconf import OmegaConf

from runner.config.build import checked_kwargs, plain
from runner.config import LOGGERS
from runner.config.compose import CONF_DIR
from runner.errors import UserError
from runner.loggers.base import Logger, RunInfo

log = logging.getLogger(__name__)


def specs(node: Any) -> dict[str, dict[str, Any]]:
    """``{name: node}`` of the selected loggers. A name or list of names (the ``logger: csv`` of
    configs saved before loggers became a group, read back by resume=) means the shipped options."""
    if node is None:
        return {}
    if isinstance(node, str) or OmegaConf.is_list(node) or isinstance(node, (list, tuple)):
        names = [node] if isinstance(node, str) else [str(n) for n in node]
        unknown = [n for n in names if not (CONF_DIR / "logger" / f"{n}.yaml").is_file()]
        if unknown:
            raise UserError(f"logger={','.join(unknown)} is not known; allowed: {', '.join(LOGGERS)}")
        return {n: OmegaConf.to_container(OmegaConf.load(CONF_DIR / "logger" / f"{n}.yaml")) for n in names}
    return {str(name): plain(spec) for name, spec in plain(node).items() if spec is not None}


def _checked(name: str, spec: dict[str, Any], run: RunInfo | None) -> tuple[Any, dict[str, Any]]:
    if "_target_" not in spec:
        raise UserError(f"logger.{name} has no _target_; the shipped loggers are {', '.join(LOGGERS)} "
                        "(logger=[csv,tensorboard])")
    target, kwargs = checked_kwargs(spec, f"logger.{name}", extra={"run": run})
    module, extra = getattr(target, "requires", None) or (None, None)
    if module is not None and importlib.util.find_spec(module) is None:
        raise UserError(f"logger={name} needs {module}: pip install 'runner[{extra}]'")
    return target, kwargs


def check_loggers(node: Any) -> None:
    for name, spec in specs(node).items():
        _checked(name, spec, None)


def build_loggers(node: Any, run: RunInfo) -> list[tuple[str, Logger]]:
    built = []
    for name, spec in specs(node).items():
        target, kwargs = _checked(name, spec, run)
        built.append((name, target(**kwargs)))
    return built


class Loggers:
    """The run's loggers as one: ``start``, ``log_row``, ``finish`` go to each of them."""

    def __init__(self, node: Any = None, run: RunInfo | None = None):
        self.node, self.run = node, run
        self.active: list[tuple[str, Logger]] | None = None  # None: not started
        self.identity: dict[str, Any] | None = None  # what ran (identify), for loggers that start later

    def start(self) -> None:
        """Build and start each logger, once. An error propagates: the run fails before training
        (a tracking server that cannot be reached, say), and the loggers started so far still
        get ``finish``."""
        if self.active is not None or self.run is None:
            return
        self.active = []
        for name, logger in build_loggers(self.node, self.run):
            logger.start()
            self.active.append((name, logger))
        if self.identity is not None:
            self._each("record what ran", lambda logger: logger.identify(self.identity))

    def log_row(self, row: dict[str, Any]) -> None:
        self.start()
        self._each("log a row", lambda logger: logger.log_row(row))

    def identify(self, identity: dict[str, Any]) -> None:
        """What ran, to each logger: now where they have started, else as each starts (a resumed
        run's loggers start at its first row, after the interrupted run's rows are repaired)."""
        self.identity = identity
        self._each("record what ran", lambda logger: logger.identify(identity))

    def finish(self, summary: dict[str, Any], status: str) -> None:
        self._each("finish", lambda logger: logger.finish(summary, status))
        self.active = []  # finished: nothing more to send

    def _each(self, what: str, call: Any) -> None:
        """A tracker failing mid-run (a full disk, a lost connection) costs its own record only:
        it is warned about once and left out from then on; metrics.jsonl has every row."""
        for name, logger in list(self.active or ()):
            try:
                call(logger)
            except Exception as e:
                log.warning("logger=%s could not %s (%s: %s); it logs nothing more in this run",
                            name, what, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                log.info("traceback of logger=%s", name, exc_info=True)  # run.log only
                self.active.remove((name, logger))
