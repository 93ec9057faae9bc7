"""Instantiate a config node (``_target_`` plus keyword arguments), checking its keys first.

The target's signature is the schema of a group option: a key the target does not take, or a
value of the wrong type, fails at start-up with the key named and the allowed keys listed. A
target that takes ``**kwargs`` (``torchvision.models.resnet18``, a user's module) accepts any
further key: those pass through unchecked. Values the code supplies (``extra``, such as the
number of labels) are passed only to targets whose signature names them.

Values are checked where the signature says what they must be: NaN and inf are refused in any
key (they pass every ``lr > 0`` check and fail at the first step), unless the target's own
default is not finite; integers must fit int64 (torch and numpy take C longs); a ``tuple[float,
float]`` needs two entries; ``Size`` and ``Count`` arguments of runner's own targets (widths,
numbers of samples) are at least 1 and 0.

``_partial_: true`` (lightning-hydra-template's way of keeping an optimizer's parameters out of
the config) is accepted and means nothing more here: the code always supplies such arguments.
"""
from __future__ import annotations

import importlib
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from runner.config.suggest import did_you_mean
from runner.errors import UserError

RESERVED = ("_target_", "_partial_")
INT64 = 2**63  # integers reach torch, numpy and the OS as C longs


@dataclass(frozen=True)
class AtLeast:
    """The smallest value an argument takes, checked (key named) before the target is called."""

    low: int


Size = Annotated[int, AtLeast(1)]  # a width, a dimension, a number of layers
Count = Annotated[int, AtLeast(0)]  # a number of samples: 0 leaves that split out


def number_problem(value: Any) -> str | None:
    """Why a config value cannot be a number the code takes: NaN or inf (they pass every ``> 0``
    check), or an integer beyond int64. Lists and dicts are looked into. None where it is fine."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
        return f"does not fit a 64-bit integer (allowed: {-INT64} to {INT64 - 1})"
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return next((problem for item in items if (problem := number_problem(item))), None)


def locate(path: str) -> Any:
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"_target_ '{path}' cannot be imported: {e}") from None


def plain(node: Any) -> dict[str, Any]:
    """A config node as a plain dict, interpolations resolved and enums as their names (a key
    that interpolates ``${trainer.monitor_mode}`` gets ``"min"``, as the YAML says)."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return {k: _named(v) for k, v in dict(node).items()}


def _named(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, dict):
        return {k: _named(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_named(v) for v in value)
    return value


def _type_ok(value: Any, annotation: Any) -> bool:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _type_ok(value, typing.get_args(annotation)[0])
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
    if _fixed_length(annotation) is not None:  # tuple[float, float]: so many entries, each of its type
        return isinstance(value, (list, tuple)) and len(value) == _fixed_length(annotation) and all(
            _type_ok(v, a) for v, a in zip(value, typing.get_args(annotation)))
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True


def _fixed_length(annotation: Any) -> int | None:
    """How many entries a ``tuple[float, float]`` holds (also inside ``Optional[...]``), or None."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType, Annotated):
        return next((n for a in args if (n := _fixed_length(a)) is not None), None)
    return len(args) if origin is tuple and args and args[-1] is not Ellipsis else None


def _lowest(annotation: Any) -> int | None:
    """The AtLeast bound of ``Size``, ``Count`` (also inside ``Optional[...]``), or None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next((low for a in typing.get_args(annotation) if (low := _lowest(a)) is not None), None)
    return next((m.low for m in getattr(annotation, "__metadata__", ()) if isinstance(m, AtLeast)), None)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Annotated:  # Size: int
        return _type_name(typing.get_args(annotation)[0])
    if typing.get_args(annotation):  # tuple[float, float], not the bare "tuple" its __name__ says
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _hints(target: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(target.__init__ if inspect.isclass(target) else target, include_extras=True)
    except Exception:  # a library's annotations that do not resolve here: check names only
        return {}


def checked_kwargs(node: Any, group: str, extra: dict[str, Any] | None = None,
                   own_keys: tuple[str, ...] = (), fill: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """(target, keyword arguments) of a node, after checking its keys against the target's
    signature. ``own_keys`` are keys runner reads itself (``interval`` of a schedule); they are
    left out of the arguments. ``fill`` holds values for keys the node leaves out (a schedule's
    run length), passed where the signature names them."""
    extra = extra or {}
    params = {k: v for k, v in plain(node).items() if k not in own_keys}
    extra = {**{k: v for k, v in (fill or {}).items() if k not in params}, **extra}
    target_path = params.pop("_target_", None)
    params.pop("_partial_", None)
    if target_path is None:
        raise UserError(f"{group} has no _target_: choose an option of the '{group}' group")
    target = locate(target_path)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: pass everything
        return target, {**params, **extra}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    accepted = {n: p for n, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    hints = _hints(target)
    user_keys = sorted(accepted.keys() - extra.keys())
    for key, value in params.items():
        default = accepted[key].default if key in accepted else None
        if number_problem(value) and not (isinstance(default, float) and not math.isfinite(default)):
            raise UserError(f"{group}.{key}={value!r} {number_problem(value)}")
        if key not in accepted:
            if takes_any:
                continue
            allowed = sorted({*user_keys, *own_keys})
            raise UserError(f"unknown key '{group}.{key}'{did_you_mean(key, allowed)}; allowed keys of {group}: "
                            f"{', '.join(allowed) or '(none)'}")
        annotation = hints.get(key, accepted[key].annotation)
        if not _type_ok(value, annotation):
            entries = _fixed_length(annotation)
            if entries is not None and isinstance(value, (list, tuple)) and len(value) != entries:
                raise UserError(f"{group}.{key}={value!r} must hold {entries} values ({_type_name(annotation)})")
            raise UserError(f"{group}.{key}={value!r} has the wrong type: expected {_type_name(annotation)}")
        low = _lowest(annotation)
        if low is not None and isinstance(value, int) and value < low:
            raise UserError(f"{group}.{key}={value} must be >= {low}")
    missing = [n for n, p in accepted.items()
               if p.default is p.empty and n not in params and n not in extra and p.kind != p.POSITIONAL_ONLY]
    if missing:
        raise UserError(f"missing required value: {', '.join(group + '.' + m for m in missing)}")
    return target, {**params, **{k: v for k, v in extra.items() if k in accepted}}


def build(node: Any, group: str, **extra: Any) -> Any:
    """Call ``node._target_`` with the node's keys plus ``extra`` (values the code supplies,
    such as the number of labels). ``group`` is the config path used in messages."""
    target, kwargs = checked_kwargs(node, group, extra)
    try:
        return target(**kwargs)
    except TypeError as e:  # a key that **kwargs passed on to a callee that does not take it
        key = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if key is None or key.group(1) not in kwargs.keys() - extra.keys():
            raise
        raise UserError(f"unknown key '{group}.{key.group(1)}': {str(e).splitlines()[0]}") from None
