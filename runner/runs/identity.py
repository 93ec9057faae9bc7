"""What ran: enough to tell two runs apart and to run one again.

``run_identity(model, device)`` is recorded in summary.json and by every tracker (their
``identify`` hook, runner/loggers/base.py):

* ``code``: the git commit and dirty flag (uncommitted changes to tracked files) of the checkout
  that holds the ``runner`` package, and of the launch folder's checkout (your project: its
  configs, your own modules), each ``{"commit", "dirty", "root"}``, or null where it is not a
  git checkout (a wheel, a folder outside any repository) or git is not installed;
* ``versions``: Python, runner, torch, CUDA (null on a CPU build of torch), cuDNN;
* ``gpu``: the device's name (null on the CPU); ``host`` and ``slurm_job`` (null off SLURM);
* ``parameters`` and ``trainable_parameters``: the model's, each tensor counted once.
"""
from __future__ import annotations

import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import nn

GIT_TIMEOUT_S = 20  # a git status on a large checkout over a network file system can take seconds


def _git(folder: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
                          check=True)
    return done.stdout.strip()


def checkout_state(folder: str, must_track: str | None = None) -> dict[str, Any] | None:
    """``{"commit", "dirty", "root"}`` of the git checkout holding ``folder``, or None. With
    ``must_track`` (a file in ``folder``), only a checkout that tracks that file counts (runner
    installed in a virtual environment inside another project's checkout is not that project's code)."""
    try:
        root = _git(Path(folder), "rev-parse", "--show-toplevel")
        if must_track is not None:
            _git(Path(folder), "ls-files", "--error-unmatch", must_track)
        commit = _git(Path(root), "rev-parse", "HEAD")
        dirty = bool(_git(Path(root), "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, no commit yet, a timeout
        return None
    return {"commit": commit, "dirty": dirty, "root": root}


def code_state() -> dict[str, dict[str, Any] | None]:
    import runner

    package = Path(runner.__file__).resolve().parent
    return {"runner": checkout_state(str(package), "__init__.py"), "cwd": checkout_state(str(Path.cwd().resolve()))}


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        runner_version = version("runner")
    except PackageNotFoundError:
        runner_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"python": platform.python_version(), "runner": runner_version, "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": str(cudnn) if cudnn else None}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    unique = {id(p): p for p in model.parameters()}.values()  # tied weights once
    return sum(p.numel() for p in unique), sum(p.numel() for p in unique if p.requires_grad)


def run_identity(model: nn.Module, device: torch.device) -> dict[str, Any]:
    """The code, versions, machine and model of this run (see the module docstring)."""
    from runner.engine.slurm import job_id

    total, trainable = parameter_counts(model)
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"code": code_state(), "versions": versions(), "gpu": gpu, "host": socket.gethostname(),
            "slurm_job": job_id(), "parameters": total, "trainable_parameters": trainable}


def record_identity(results: Any, model: nn.Module, device: torch.device, tags: Any = ()) -> dict[str, Any]:
    """Into the run's summary.json (with the config's ``tags``) and to its trackers: one call in the
    run's lifecycle, once the model is built (runner/engine/run.py ``RunLife.prepare``). On
    processes other than rank 0 the results are disabled and nothing is written."""
    identity = run_identity(model, device)
    results.summary.update(identity, tags=[str(t) for t in tags or ()])
    if results.enabled:
        results.loggers.identify(identity)
        results.write_summary()  # now, so that a run killed later still says what ran (held on resume: later)
    return identity


def describe(identity: dict[str, Any]) -> dict[str, str]:
    """The identity as flat strings, for trackers whose tags are text (MLflow, TensorBoard)."""
    out: dict[str, str] = {}
    for where, state in (identity.get("code") or {}).items():
        out[f"git.{where}.commit"] = state["commit"] if state else "none (not a git checkout)"
        if state:
            out[f"git.{where}.dirty"] = str(bool(state["dirty"])).lower()
    for name, value in (identity.get("versions") or {}).items():
        out[f"version.{name}"] = str(value)
    for key in ("gpu", "host", "slurm_job", "parameters", "trainable_parameters"):
        out[key] = str(identity.get(key))
    return out

