"""Experiment tracking: the ``logger`` config group, several at once.

``python -m runner logger=[csv,tensorboard,mlflow,wandb]`` (default ``[csv]``; ``logger=[]`` for
none). Each option in ``runner/conf/logger/`` is a node ``logger.<name>`` with a ``_target_`` (a
``Logger`` class) and its keys (``logger.mlflow.tracking_uri=http://host:5000``); a module of
your own plugs in by ``_target_`` the same way. metrics.jsonl and summary.json are written by
the engine whatever the loggers.

The interface (``runner.loggers.base.Logger``), called on the run's main process only:

* ``Class(run=RunInfo, **keys)`` stores settings; ``requires = (module, extra)`` names the
  package it needs, checked before the run starts (exit 2: ``pip install 'runner[<extra>]'``);
* ``start()`` when the run starts: open the tracker, record the config;
* ``log_row(row)`` for each metrics.jsonl row (``epoch``, ``step``, ``split``, metrics);
* ``finish(summary, status)`` at the end, after the plots are drawn.

``RunInfo`` holds what a logger knows of its run: folder, output_root, name (the preset), title
(``focal_densenet-loss-bce``), the resolved config as a dict, the job's overrides, the sweep
folder. ``Loggers`` (runner/loggers/builder.py) builds them from the config node and keeps one
that fails mid-run from failing the run.
"""
from runner.loggers.base import JobInfo, Logger, RunInfo
from runner.loggers.builder import Loggers, build_loggers, check_loggers

__all__ = ["JobInfo", "Logger", "Loggers", "RunInfo", "build_loggers", "check_loggers"]
