"""A ``_target_`` changed on the command line starts its node clean.

``optim._target_=torch.optim.RAdam`` on the ``sgd`` preset would otherwise keep the preset's
``momentum``, which RAdam does not take, and the run would stop on a key the user never wrote.
``drop_preset_keys`` removes, from each node whose ``_target_`` the command line sets, the keys
that came from the preset and that the new target does not take with the same meaning:

* kept: runner's own keys of the group (``schedule.interval``, ``optim.decay_bias_and_norm``),
  every key the command line gives (a key the new target refuses then still exits 2, named),
  and a preset key that the new target names *with the default the old target gives it*
  (``lr``, ``weight_decay``, ``betas`` from Adam to RAdam): the same name and the same default
  are taken as the same meaning;
* dropped: the rest. ConstantLR's ``factor`` (default 1/3) is not ReduceLROnPlateau's
  ``factor`` (0.1), nor Adam's ``weight_decay`` (0) AdamW's decoupled one (0.01); a preset key
  that only a ``**kwargs`` would take (torchvision's ``name`` given to your own module) goes too.

Where the old target is not known (an option of a user's ``--config-dir``, a nested node), a
preset key is kept where the new target names it. The run log says which keys were dropped.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("runner")
UNKNOWN = object()  # the old target's default where the old target or its signature is not known


def own_keys(group: str) -> tuple[str, ...]:
    """Keys runner reads itself in a group's node (never passed to the target)."""
    from runner.config.build import RESERVED

    if group == "schedule":
        from runner.schedule import OWN_KEYS
    elif group == "optim":
        from runner.optim import OWN_KEYS
    else:
        OWN_KEYS = ()
    return (*RESERVED, *OWN_KEYS)


def signature_of(path: str) -> dict[str, inspect.Parameter] | None:
    """The named parameters of a target (None: it cannot be imported or has no signature)."""
    from runner.config.build import locate
    from runner.errors import UserError

    try:
        parameters = inspect.signature(locate(path)).parameters
    except (UserError, TypeError, ValueError):
        return None
    return {n: p for n, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def preset_target(group: str, choices: dict[str, Any] | None) -> str | None:
    """The ``_target_`` of the option the group's node was composed from (runner's own options)."""
    from runner.config import compat

    choice = (choices or {}).get(group)
    if not choice or "/" in group:
        return None
    return compat.options(group).get(str(choice)) or None


def same_default(old: dict[str, inspect.Parameter] | None, new: inspect.Parameter, key: str) -> bool:
    if old is None or key not in old:  # nothing to compare with: the name alone decides
        return True
    try:
        return bool(old[key].default == new.default)
    except Exception:  # defaults that do not compare (tensors): not the same
        return False


def drop_preset_keys(cfg: DictConfig, overrides: Sequence[str], choices: dict[str, Any] | None = None) -> list[str]:
    """Drop from ``cfg`` (in place) the preset keys of every node whose ``_target_`` the
    overrides set, which the new target does not take with the same meaning (module docstring).
    ``overrides``: Hydra's task overrides; ``choices``: the option chosen in each group (where
    known, the old target's defaults decide). Returns the dropped keys as ``group.key``."""
    given = {str(o).split("=", 1)[0].lstrip("+~") for o in overrides if "=" in str(o) or str(o).startswith("~")}
    dropped: list[str] = []
    for key in sorted(given):
        if not key.endswith("._target_") or key.startswith("hydra."):
            continue
        path = key[: -len("._target_")]
        node = OmegaConf.select(cfg, path, throw_on_missing=False)
        if not isinstance(node, DictConfig) or not isinstance(node.get("_target_"), str):
            continue
        new = signature_of(node._target_)
        if new is None:  # not importable: the build says so, naming the target
            continue
        old_path = preset_target(path, choices)
        old = signature_of(old_path) if old_path and old_path != node._target_ else None
        kept = own_keys(path)
        for name in list(node.keys()):
            name = str(name)
            if name in kept or f"{path}.{name}" in given:
                continue
            if name in new and same_default(old, new[name], name):
                continue
            with open_dict(node):
                del node[name]
            dropped.append(f"{path}.{name}")
    if dropped:
        log.info("a new _target_ starts its node clean: dropped the preset's %s (the new target does not take "
                 "them, or gives them another default); set them on the command line to keep them", ", ".join(dropped))
    return dropped
