"""Shared test fixtures: where the real data copies live, and small CPU settings."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (see each PROVENANCE.md); tests needing it skip where absent.
SHARED_DATA = Path(os.environ.get("RUNNER_SHARED_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA


def require(path: Path) -> Path:
    """Skip the calling test, with the reason, when a data file is absent."""
    if not path.exists():
        pytest.skip(f"data not available: {path} is absent")
    return path


def compose(*overrides: str, with_hydra: bool = False):
    """The composed config, as `python -m runner <overrides>` would see it (hydra keys removed
    unless ``with_hydra``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from runner.config.compose import register_configs, register_resolvers

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "runner" / "conf"), version_base=None):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=with_hydra)


def run_in_process(tmp_path: Path, *overrides: str) -> tuple[int, Path]:
    """Run a job in this process through ``runner.run`` (the users' Python entry: the same
    composition, checks and run folder as the command line), into ``tmp_path/run``; returns
    (exit code, run folder). A config rejected before the run starts gives exit code 2."""
    from runner import run
    from runner.errors import EXIT_USER_ERROR, UserError

    run_dir = tmp_path / "run"
    try:
        summary = run([*overrides, f"hydra.run.dir={run_dir}"])
    except UserError:
        return EXIT_USER_ERROR, run_dir
    return summary["exit_code"], run_dir


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    """`python -m runner <args>` in a subprocess; returns the CompletedProcess."""
    import subprocess
    import sys

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def only_run_folder(output_root: Path) -> Path:
    runs = sorted((output_root / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def relative_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over every tensor of two state dicts (b's keys)."""
    import torch

    flat_a = torch.cat([a[k].double().flatten() for k in b])
    flat_b = torch.cat([b[k].double().flatten() for k in b])
    return float((flat_a - flat_b).norm() / flat_b.norm())
