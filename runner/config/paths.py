"""Where things are, per machine: the ``paths`` group's resolver, the launch folder's ``.env``, and
a config folder of your own from the environment.

* ``${launch_path:<path>}``: ``<path>`` taken from the launch folder (the folder ``python -m
  runner`` started in, also where Hydra's ``hydra.job.chdir=true`` moved away from); an absolute
  path or ``~/...`` stays as it is. ``paths.data_dir`` is ``${launch_path:${oc.env:RUNNER_DATA_DIR,data}}``.
* ``.env`` in the launch folder: ``KEY=VALUE`` lines (``export KEY=VALUE``, ``# comments``,
  values in single or double quotes) read into the environment at start-up, before the config is
  composed; a variable already set is never replaced. Keep it out of git, as lightning-hydra-
  template's users do: ``RUNNER_DATA_DIR=/scratch/me/data``, ``MLFLOW_TRACKING_URI=...``.
* ``RUNNER_CONFIG_DIR``: a folder of your own configs, as ``--config-dir`` gives it (the command
  line's wins); its ``local/default.yaml``, if there is one, is applied to every run after the
  experiment (config.yaml's ``optional local: default``): your git-ignored overrides.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from runner.errors import UserError

_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


def launch_folder() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.cwd)
    except Exception:  # composing outside a Hydra run (the compose API before a job): the process's folder
        return Path.cwd()


def launch_path(path: Any) -> str:
    """``${launch_path:data}`` -> ``<launch folder>/data``; absolute paths and ``~`` as they are."""
    expanded = Path(os.path.expanduser(str(path)))
    if expanded.is_absolute():
        return str(expanded)
    return os.path.normpath(launch_folder() / expanded)


def read_dotenv(path: Path) -> dict[str, str]:
    """The ``KEY=VALUE`` pairs of a .env file; a line that is none of those exits 2 naming it."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise UserError(f"{path}:{number}: {line.strip()!r} is not KEY=VALUE (a .env line, e.g. RUNNER_DATA_DIR=/data)")
        key, value = match.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:  # an unquoted value ends where a comment starts
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def load_dotenv(folder: Path | None = None) -> dict[str, str]:
    """Read ``<folder>/.env`` (the launch folder) into os.environ, never over a variable already
    set; the variables it set."""
    path = (folder or Path.cwd()) / ".env"
    if not path.is_file():
        return {}
    added = {k: v for k, v in read_dotenv(path).items() if k not in os.environ}
    os.environ.update(added)
    return added


def config_dir_argv(argv: list[str]) -> list[str]:
    """The command line with ``--config-dir $RUNNER_CONFIG_DIR`` where it names none itself."""
    folder = os.environ.get("RUNNER_CONFIG_DIR")
    given = any(a in ("--config-dir", "-cd") or a.startswith(("--config-dir=", "-cd=")) for a in argv[1:])
    if not folder or given:
        return argv
    if not Path(folder).is_dir():
        raise UserError(f"RUNNER_CONFIG_DIR={folder} is not a folder")
    return [argv[0], "--config-dir", str(Path(folder).resolve()), *argv[1:]]
