"""A run's title: its experiment's name plus the config-group options its own overrides chose.

``python -m runner -m loss=bce,focal`` runs two jobs of ``focal_densenet``; they are titled
``focal_densenet-loss-bce`` and ``focal_densenet-loss-focal`` (plots, the closing table, the
trackers' run names, and a single run's folder). Groups that do not change what is learned
(device, logger, trainer) stay out, as does a ``name=`` given on the command line: then that name
is the title.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable

NOT_IN_TITLE = ("experiment", "hparams_search", "device", "logger", "trainer")
MAX_LENGTH = 64  # characters: a folder name that stays readable in a listing
UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")  # anything else (/, spaces, quotes, commas, =) becomes _


def _key_value(override: str) -> tuple[str, str]:
    key, _, value = str(override).partition("=")
    return key.lstrip("+~"), value


def run_title(name: str, overrides: Iterable[str], groups: Iterable[str]) -> str:
    """``name`` plus ``-group-option`` for each config-group override, file-system safe and at
    most 64 characters (a longer one keeps a hash of the rest, so titles stay distinct)."""
    overrides = [_key_value(o) for o in overrides]
    if any(key == "name" for key, _ in overrides):
        return UNSAFE.sub("_", str(name))
    groups = set(groups)
    # key-value, not key=value: a folder name with "=" would break `resume=<folder>` on the command line
    chosen = [f"{key.replace('/', '.')}-{value}" for key, value in overrides
              if key in groups and key not in NOT_IN_TITLE and not key.startswith("hydra")]
    title = UNSAFE.sub("_", "-".join([str(name), *chosen]))
    if len(title) > MAX_LENGTH:
        digest = hashlib.sha1(title.encode()).hexdigest()[:8]
        title = f"{title[:MAX_LENGTH - 9]}-{digest}"
    return title


def title_resolver(name: Any, overrides: Any, choices: Any) -> str:
    """``${run_title:${name},${hydra:overrides.task},${hydra:runtime.choices}}`` in the run folder's name."""
    return run_title(str(name), [str(o) for o in overrides or ()], [str(k) for k in (choices or {})])
