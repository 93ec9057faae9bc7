"""Instantiate a config node (``_target_`` plus keyword arguments), checking its keys first.

The target's signature is the schema of a group option: a key the target does not take, or a
value of the wrong type, fails at start-up with the key named and the allowed keys listed.
"""
from __future__ import annotations

import importlib
import inspect
import types
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from runner.errors import UserError


def locate(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"_target_ '{path}' cannot be imported: {e}") from None


def _type_ok(value: Any, annotation: Any) -> bool:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (str, bool):
        return isinstance(value, annotation)
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def build(node: DictConfig | dict, group: str, **extra: Any) -> Any:
    """Call ``node._target_`` with the node's keys plus ``extra`` (values the code supplies,
    such as the number of labels). ``group`` is the config path used in messages."""
    params = OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else dict(node)
    target_path = params.pop("_target_", None)
    if target_path is None:
        raise UserError(f"{group} has no _target_: choose an option of the '{group}' group")
    target = locate(target_path)
    signature = inspect.signature(target)
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    accepted = {n: p for n, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    user_keys = sorted(accepted.keys() - extra.keys())
    for key, value in params.items():
        if key not in accepted:
            raise UserError(f"unknown key '{group}.{key}'; allowed keys of {group}: {', '.join(user_keys)}")
        annotation = hints.get(key, accepted[key].annotation)
        if not _type_ok(value, annotation):
            raise UserError(
                f"{group}.{key}={value!r} has the wrong type: expected {_type_name(annotation)}"
            )
    missing = [n for n, p in accepted.items() if p.default is p.empty and n not in params and n not in extra]
    if missing:
        raise UserError(f"missing required value: {', '.join(group + '.' + m for m in missing)}")
    kwargs = {**params, **{k: v for k, v in extra.items() if k in accepted}}
    return target(**kwargs)
