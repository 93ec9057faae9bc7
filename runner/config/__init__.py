"""The config layer: everything between the command line and the engine.

* schema.py: the engine's own settings as dataclasses (types, defaults), and ``typed``: the
  composed config as those objects — the Hydra config stops there;
* compose.py: Hydra composition (the shipped configs in runner/conf/, resolvers);
* rules.py: every check of a job's settings, run before anything is built (exit 2, one line);
* build.py: a ``_target_`` node to an object, its keys checked against the target's signature;
* compat.py: which datasets, models and losses fit each family;
* messages.py: Hydra's composition errors as one line naming the key and what is allowed, with
  the nearest allowed name (suggest.py: ``did you mean``);
* prepare.py: the composed config as a new job runs it: a ``_target_`` changed on the command
  line starts its node clean (targets.py), mode=eval|predict take the checkpoint's run's config
  (from_checkpoint.py).
"""
from runner.config.schema import (COMPILE_MODES, LOGGERS, PRECISIONS, PROGRESS, Config, DeviceConfig, EarlyStopping,
                                  Mode, MonitorMode, Strategy, TrainerConfig, same_value, typed)

__all__ = ["COMPILE_MODES", "LOGGERS", "PRECISIONS", "PROGRESS", "Config", "DeviceConfig", "EarlyStopping", "Mode",
           "MonitorMode", "Strategy", "TrainerConfig", "same_value", "typed"]
