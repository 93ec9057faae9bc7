"""Which datasets, models and losses fit each family.

A family module (runner/families/) has ``build(bundle, model, loss, seed) -> Family`` (runner/engine/family.py) and
``ACCEPTS``: the ``_target_`` prefixes of runner's own dataset, model and loss options that fit
it. A target outside runner (a user's module, ``torchvision.models.resnet18``) is not judged by
its name: the family checks what it builds. ``check_compatible`` runs before anything is built,
so an incompatible pair exits 2 with one line that names the pair and the options that fit.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from omegaconf import OmegaConf

from runner.config.build import plain
from runner.config.compose import CONF_DIR
from runner.errors import UserError

NAMES = ("multilabel", "density", "charlm", "regression", "classification")
RUNNER_TARGETS = ("runner.",)  # targets judged by name; others by what they build


@dataclass(frozen=True)
class Accepts:
    datasets: tuple[str, ...]
    models: tuple[str, ...]
    losses: tuple[str, ...]


def module_of(family: str) -> ModuleType:
    """``runner.families.<family>``, or a family outside runner given by its module path."""
    if family not in NAMES and "." not in family:
        raise UserError(f"dataset family {family!r} is not known; allowed: {', '.join(NAMES)} "
                        "(or a module path for your own family)")
    return importlib.import_module(family if "." in family else f"runner.families.{family}")


def target_of(node: Any) -> str:
    return str(plain(node).get("_target_") or "")


def family_of_dataset(dataset: Any) -> str | None:
    """The family of one of runner's dataset options (None for a user's dataset: its bundle says)."""
    target = target_of(dataset)
    for name in NAMES:
        if target.startswith(module_of(name).ACCEPTS.datasets):
            return name
    return None


def options(group: str) -> dict[str, str]:
    """runner's options of a config group and their targets (an option that extends another,
    as densenet121 extends torchvision, inherits its target)."""
    found: dict[str, str] = {}

    def target(option: str) -> str:
        node = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
        if "_target_" in node:
            return str(node._target_)
        bases = [d for d in node.get("defaults", []) if isinstance(d, str) and d != "_self_"]
        return target(bases[0]) if bases else ""

    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        found[path.stem] = target(path.stem)
    return found


def check_compatible(family: str, choices: dict[str, str], **nodes: Any) -> None:
    """Exit 2 (UserError) when the model or loss node is one of runner's options that does not
    fit ``family``. ``nodes``: model=..., loss=...; ``choices``: the option names chosen."""
    accepts: Accepts = module_of(family).ACCEPTS
    where = f"the {family} family" + (f" (dataset={choices['dataset']})" if choices.get("dataset") else "")
    for group, node in nodes.items():
        target = target_of(node)
        allowed = getattr(accepts, f"{group}es" if group == "loss" else f"{group}s")
        if target.startswith(RUNNER_TARGETS) and not target.startswith(allowed):
            fitting = [name for name, t in options(group).items() if t.startswith(allowed)]
            chosen = choices.get(group) or target
            raise UserError(f"{group}={chosen} does not fit {where}; its {group} options: {', '.join(fitting)}"
                            + (" (or your own module by _target_)" if group == "model" else ""))


def family_module(config: Any) -> ModuleType | None:
    """The module of a job's family (runner/families/), None for a user's dataset."""
    name = family_of_dataset(config.dataset)
    return module_of(name) if name else None
