"""Launchers and sweepers compose; a parallel joblib sweep of 4 jobs, one failing, completes
with no folder collisions and a complete summary.csv."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from conftest import ROOT, run_cli
from runner.config.compose import register_configs, register_resolvers


@pytest.mark.parametrize("override, target", [
    ("hydra/launcher=parallel", "JoblibLauncher"),
    ("hydra/launcher=slurm_gpu", "SlurmLauncher"),
    ("hydra/launcher=slurm_node", "SlurmLauncher"),
    ("hydra/sweeper=search", "SearchSweeper"),
])
def test_launcher_and_sweeper_configs_compose(override, target):
    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "runner" / "conf"), version_base=None):
        cfg = compose("config", overrides=[override], return_hydra_config=True)
    node = cfg.hydra.launcher if "launcher" in override else cfg.hydra.sweeper
    assert node._target_.endswith(target)


def test_parallel_sweep_with_a_failing_job(tmp_path):
    result = run_cli("-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=4", "experiment=regression",
                     "trainer.progress=none", "trainer.max_epochs=1,2,0,3", f"output_root={tmp_path}")
    assert result.returncode == 1  # one job failed; the sweep still ran the others
    (sweep,) = (tmp_path / "multirun").iterdir()
    table = pd.read_csv(sweep / "summary.csv").sort_values("job")
    assert list(table["job"]) == [0, 1, 2, 3]
    assert list(table["status"]) == ["completed", "completed", "failed", "completed"]
    assert "trainer.max_epochs=0 must be > 0" in table.iloc[2]["error"]
    for job in range(4):
        assert json.loads((sweep / str(job) / "summary.json").read_text())["status"] in ("completed", "failed")
