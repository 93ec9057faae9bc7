"""One clear message for a config that Hydra could not compose: the key, and what is allowed."""
from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from runner.config.compose import CONF_DIR
from runner.config.suggest import did_you_mean
from runner.errors import UserError

_NOISE = ("Set the environment variable HYDRA_FULL_ERROR", "object_type=", "reference_type=", "full_key:")
_UNKNOWN_KEY = ("is not in struct", "not in '")
_UNKNOWN_OPTION = r"(?:In '([\w/]+)': )?Could not (?:find|load) '([\w/]+)/([^/']+)'"


def describe(error: BaseException, overrides: list[str]) -> str:
    """Hydra's composition error as one line: an unknown option or key with the nearest allowed
    name (``did you mean``) and the allowed ones, any other error's lines joined."""
    own = _user_error_in(error)
    if own is not None:  # runner's own check, raised from inside Hydra (a resolver): its message alone
        return str(own)
    entry = _entry_not_an_option(overrides)
    if entry is not None:  # Hydra fails on it with "argument of type 'int' is not iterable"
        return entry
    parts = [str(error)]
    if error.__cause__ is not None and str(error.__cause__) not in parts[0]:
        parts.append(str(error.__cause__))
    lines = [ln.rstrip() for part in parts for ln in part.splitlines()]
    if "Config search path:" in lines:  # Hydra's list of search paths says nothing to a user
        lines = lines[: lines.index("Config search path:")]
    message = "\n".join(dict.fromkeys(ln for ln in lines if ln.strip()))  # drop repeated lines, keep order
    option = re.search(_UNKNOWN_OPTION, message)
    if option:
        return _unknown_option(message, *option.groups())
    key = _offending_key(message)
    if key and any(marker in message for marker in _UNKNOWN_KEY):
        return _unknown_key(key, message, overrides)
    kept = [ln.strip() for ln in message.splitlines() if not any(n in ln for n in _NOISE)]
    return ": ".join(ln.rstrip(".:") if i < len(kept) - 1 else ln for i, ln in enumerate(kept))


def _unknown_option(message: str, where: str | None, group: str, option: str) -> str:
    """``loss=focall``: Hydra lists the group's options (with the user's --config-dir); for a
    list (``logger=[csv,nope]``) it lists none, and the shipped ones are read here."""
    listed = re.search(rf"Available options in '{re.escape(group)}':\n((?:\t.*\n?)*)", message)
    options = [o.strip() for o in listed.group(1).splitlines() if o.strip()] if listed else []
    if not options and (CONF_DIR / group).is_dir():
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    inside = f" (in '{where}')" if where and where not in ("config", "hydra/config") else ""
    text = f"unknown option {group}={option}{inside}{did_you_mean(option, options)}"
    return text + (f"; available options in '{group}': {', '.join(options)}" if options else "")


def _unknown_key(key: str, message: str, overrides: list[str]) -> str:
    """``trainer.batch_sz=8``: runner's line instead of Hydra's ``+key`` hint, which only a
    target taking ``**kwargs`` would accept (for the engine's groups typed() refuses it)."""
    parent, _, name = key.rpartition(".")
    allowed, open_target = _allowed_keys(parent, overrides)
    text = f"unknown key '{key}'{did_you_mean(name, allowed)}"
    if allowed:
        text += f"; allowed keys of {parent or 'the config'}: {', '.join(allowed)}"
    append = re.search(r"To append to your config use (\S+)", message)
    if open_target and append:
        text += f"; {parent}'s _target_ takes any further key (**kwargs): add one with {append.group(1)}"
    return text


def _entry_not_an_option(overrides: list[str]) -> str | None:
    """A list of a group's options with an entry that is not a name (``logger=[csv,123]``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in overrides:
        try:
            override = parser.parse_override(text)
            group, value = override.key_or_group, override.value()
        except Exception:  # not parseable: Hydra's own message says why
            continue
        if not isinstance(value, list) or not (CONF_DIR / group).is_dir():
            continue
        entry = next((v for v in value if not isinstance(v, str)), None)
        if entry is not None:
            options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
            return f"{text}: {entry!r} is not an option of the '{group}' group; available options: {', '.join(options)}"
    return None


def _user_error_in(error: BaseException | None) -> UserError | None:
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, UserError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _offending_key(message: str) -> str | None:
    for pattern in (r"full_key: ([\w.]+)", r"Could not override '([\w.]+)'", r"Key '([\w.]+)' is not in struct"):
        match = re.search(pattern, message)
        if match:
            return match.group(1)
    return None


def _allowed_keys(parent: str, overrides: list[str]) -> tuple[list[str], bool]:
    """The keys of the node ``parent`` composed without the overrides under it, and whether its
    ``_target_`` takes any further key (a ``**kwargs``)."""
    from hydra import compose, initialize_config_dir

    from runner.config.compose import register_configs, register_resolvers

    register_configs()
    register_resolvers()
    kept = [o for o in overrides if not o.lstrip("+~").startswith(parent + ".") and not o.startswith("-")]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose("config", overrides=kept)
        node = OmegaConf.select(cfg, parent) if parent else cfg
    except Exception:
        return [], False
    if not isinstance(node, DictConfig):
        return [], False
    return sorted(str(k) for k in node.keys() if k != "_target_"), _takes_any_key(node.get("_target_"))


def _takes_any_key(target: Any) -> bool:
    import inspect

    from runner.config.build import locate

    if not isinstance(target, str):
        return False
    try:
        return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(locate(target)).parameters.values())
    except (UserError, TypeError, ValueError):
        return False
