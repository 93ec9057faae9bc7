"""One clear message for a config that Hydra could not compose: the key, and what is allowed."""
from __future__ import annotations

import re

from omegaconf import OmegaConf

from runner.config.compose import CONF_DIR
from runner.errors import UserError

_NOISE = ("Set the environment variable HYDRA_FULL_ERROR", "object_type=", "reference_type=")
_UNKNOWN_KEY = ("is not in struct", "not in '")


def describe(error: BaseException, overrides: list[str]) -> str:
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
    lines = [ln for ln in lines if ln.strip() and not any(n in ln for n in _NOISE)]
    message = "\n".join(dict.fromkeys(lines))  # drop repeated lines, keep order
    missing = re.search(r"Could not load '([\w/]+)/([^/']+)'", message)
    if missing and (CONF_DIR / missing.group(1)).is_dir():  # a list of options (logger=[csv,nope]): Hydra lists none
        options = sorted(p.stem for p in (CONF_DIR / missing.group(1)).glob("*.yaml"))
        message += f"\navailable options in '{missing.group(1)}': {', '.join(options)}"
    key = _offending_key(message)
    if key and "." in key and any(marker in message for marker in _UNKNOWN_KEY):
        allowed = _allowed_keys(key.rsplit(".", 1)[0], overrides)
        if allowed:
            message += f"\nallowed keys of {key.rsplit('.', 1)[0]}: {', '.join(allowed)}"
    return message


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


def _allowed_keys(parent: str, overrides: list[str]) -> list[str]:
    """Compose the config without the overrides under ``parent`` and list that node's keys."""
    from hydra import compose, initialize_config_dir

    from runner.config.compose import register_configs, register_resolvers

    register_configs()
    register_resolvers()
    kept = [o for o in overrides if not o.lstrip("+~").startswith(parent + ".") and not o.startswith("-")]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose("config", overrides=kept)
        node = OmegaConf.select(cfg, parent)
        return sorted(k for k in node.keys() if k != "_target_") if node is not None else []
    except Exception:
        return []
