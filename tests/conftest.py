"""Shared test fixtures: where the real data copies live, and small CPU settings."""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (see each PROVENANCE.md); tests needing it skip where absent.
SHARED_DATA = Path(os.environ.get("RUNNER_SHARED_DATA", ROOT.parent / "shared" / "data"))

# Two threads at most; fewer where pytest-xdist's workers share the cores (-n auto: one each).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))

NETWORK_GUARD = ROOT / "tests" / "network_guard"
sys.path.insert(0, str(NETWORK_GUARD))
import runner_network_guard  # noqa: E402

_guard_logs = itertools.count()


@pytest.fixture(autouse=True)
def network_attempts(request, monkeypatch, tmp_path_factory):
    """No test opens a network connection (tests/network_guard/): outbound connections raise, here
    and in the Python subprocesses the test starts, and a test that tried fails. The list of the
    attempts (this process's) is the fixture's value. ``@pytest.mark.network`` lets a test through."""
    if request.node.get_closest_marker("network"):
        yield []
        return
    attempts: list[str] = []
    log = tmp_path_factory.getbasetemp() / f"network_attempts_{os.getpid()}_{next(_guard_logs)}.log"
    monkeypatch.setenv("RUNNER_TEST_NETWORK_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(NETWORK_GUARD), *filter(None, [os.environ.get("PYTHONPATH")])]))
    for (owner, name), replacement in runner_network_guard.guarded(attempts.append).items():
        monkeypatch.setattr(owner, name, replacement)
    yield attempts
    tried = attempts + (log.read_text().splitlines() if log.is_file() else [])
    if tried:
        pytest.fail(f"{request.node.nodeid} tried to open network connections: {'; '.join(tried[:5])}", pytrace=False)


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


def rejected(tmp_path: Path, *overrides: str) -> tuple[int, str]:
    """Run a job that should be refused through ``runner.run``; (exit code, the one-line error).
    A run rejected before it trained leaves no folder: the error comes from the returned summary."""
    from runner import run
    from runner.errors import UserError

    try:
        result = run([*overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    except UserError as e:
        return 2, str(e)
    return result["exit_code"], result.get("error") or ""


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
