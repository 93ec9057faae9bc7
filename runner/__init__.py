"""runner: a configuration-driven experiment runner for PyTorch.

    python -m runner experiment=focal_densenet            # the command line
    from runner import run                                 # the same from Python
    summary = run(["experiment=iwae_mnist", "trainer.max_epochs=1"])
"""
from __future__ import annotations

from typing import Any, Sequence


def run(overrides: Sequence[str] = (), config_dir: str | None = None) -> dict[str, Any]:
    """Run one job as ``python -m runner <overrides>`` would, in this process; returns its summary
    (``status``, ``metrics``, ..., plus ``run_dir`` and ``exit_code``). See runner/api.py."""
    from runner.api import run as run_job

    return run_job(overrides, config_dir)
