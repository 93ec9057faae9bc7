"""Paths as lightning-hydra-template users expect (runner/config/paths.py, runner/conf/paths/):
dataset roots under paths.data_dir (from the launch folder, or $RUNNER_DATA_DIR), an absolute root
as given, output_root and paths.output_dir as one, the launch folder's .env, and a git-ignored
local/default.yaml applied after the experiment."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from runner.config.paths import load_dotenv, read_dotenv
from runner.errors import UserError


def resolved(*overrides: str, config_dir: str | None = None) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from runner.config.compose import compose_job

    HydraConfig.instance().cfg = None  # no earlier run's config in this process: the launch folder is the cwd
    cfg = compose_job(list(overrides), config_dir)
    return OmegaConf.to_container(cfg, resolve=False) | {
        "resolved": {k: OmegaConf.select(cfg, k) for k in ("dataset.root", "paths.data_dir", "output_root",
                                                           "paths.output_dir", "trainer.max_epochs", "trainer.seed")}}


def test_dataset_roots_live_under_paths_data_dir_unless_given(monkeypatch, tmp_path):
    monkeypatch.delenv("RUNNER_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # the launch folder
    got = resolved("experiment=iwae_mnist")["resolved"]
    assert got["paths.data_dir"] == str(tmp_path / "data") and got["dataset.root"] == str(tmp_path / "data" / "mnist")
    monkeypatch.setenv("RUNNER_DATA_DIR", "/scratch/me/data")
    assert resolved("experiment=iwae_mnist")["resolved"]["dataset.root"] == "/scratch/me/data/mnist"
    assert resolved("experiment=iwae_mnist", "paths.data_dir=/d")["resolved"]["dataset.root"] == "/d/mnist"
    assert resolved("experiment=iwae_mnist", "dataset.root=/abs/mnist")["resolved"]["dataset.root"] == "/abs/mnist"


def test_output_root_and_paths_output_dir_move_the_run_folders_alike(monkeypatch):
    monkeypatch.delenv("RUNNER_OUTPUT_DIR", raising=False)
    assert resolved()["resolved"]["output_root"] == "outputs"
    assert resolved("paths.output_dir=/o")["resolved"]["output_root"] == "/o"
    assert resolved("output_root=/p")["resolved"]["output_root"] == "/p"  # the key tests and docs use
    monkeypatch.setenv("RUNNER_OUTPUT_DIR", "/q")
    assert resolved()["resolved"]["output_root"] == "/q"


def test_a_local_config_applies_after_the_experiment_and_before_the_command_line(tmp_path, monkeypatch):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "default.yaml").write_text("# @package _global_\ntrainer:\n  max_epochs: 7\n  seed: 5\n")
    monkeypatch.delenv("RUNNER_CONFIG_DIR", raising=False)
    assert resolved("experiment=regression")["resolved"]["trainer.max_epochs"] == 2  # no local folder: the preset's
    got = resolved("experiment=regression", "trainer.seed=9", config_dir=str(tmp_path))["resolved"]
    assert (got["trainer.max_epochs"], got["trainer.seed"]) == (7, 9)  # local over the preset, the command line over both
    monkeypatch.setenv("RUNNER_CONFIG_DIR", str(tmp_path))
    assert resolved("experiment=regression")["resolved"]["trainer.max_epochs"] == 7


def test_dotenv_lines_and_what_they_never_replace(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text(
        "# machine settings\n\nexport RUNNER_T_A=/data/a\nRUNNER_T_B = 'with spaces # kept'\n"
        'RUNNER_T_C="x=y"\nRUNNER_T_D=plain # a comment\nRUNNER_T_SET=from-file\n')
    monkeypatch.setenv("RUNNER_T_SET", "already")
    for key in ("RUNNER_T_A", "RUNNER_T_B", "RUNNER_T_C", "RUNNER_T_D"):
        monkeypatch.delenv(key, raising=False)
    assert read_dotenv(tmp_path / ".env") == {"RUNNER_T_A": "/data/a", "RUNNER_T_B": "with spaces # kept",
                                              "RUNNER_T_C": "x=y", "RUNNER_T_D": "plain", "RUNNER_T_SET": "from-file"}
    added = load_dotenv(tmp_path)
    assert "RUNNER_T_SET" not in added and os.environ["RUNNER_T_SET"] == "already"
    assert os.environ["RUNNER_T_A"] == "/data/a" and os.environ["RUNNER_T_D"] == "plain"
    (tmp_path / ".env").write_text("GOOD=1\nthis is not a setting\n")
    with pytest.raises(UserError, match=r"\.env:2: 'this is not a setting' is not KEY=VALUE"):
        read_dotenv(tmp_path / ".env")


def test_the_launch_folders_env_and_local_config_on_the_command_line(tmp_path):
    """From a project folder: its .env names the data and the config folder, whose local/default.yaml
    applies; a .env line that cannot be read exits 2 with one line."""
    (tmp_path / "conf" / "local").mkdir(parents=True)
    (tmp_path / "conf" / "local" / "default.yaml").write_text("# @package _global_\ntrainer:\n  max_epochs: 7\n")
    (tmp_path / ".env").write_text("RUNNER_DATA_DIR=mydata\nRUNNER_CONFIG_DIR=conf\n")
    import subprocess

    clean = {k: v for k, v in os.environ.items() if k not in ("RUNNER_DATA_DIR", "RUNNER_CONFIG_DIR")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "runner", *args], cwd=tmp_path, capture_output=True, text=True,
                              env={**clean, "PYTHONPATH": str(ROOT)}, timeout=300)

    shown = cli("experiment=iwae_mnist", "--cfg", "job", "--resolve")
    assert shown.returncode == 0, shown.stderr
    cfg = OmegaConf.create(shown.stdout)
    assert cfg.dataset.root == str(tmp_path / "mydata" / "mnist") and cfg.trainer.max_epochs == 7
    (tmp_path / ".env").write_text("RUNNER_DATA_DIR=mydata\noops\n")
    bad = cli("experiment=iwae_mnist", "--cfg", "job")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"error: {tmp_path / '.env'}:2: 'oops' is not KEY=VALUE (a .env line, "
                                               "e.g. RUNNER_DATA_DIR=/data)"]


def test_ckpt_path_to_a_runs_last_checkpoint_says_it_fine_tunes(tmp_path, caplog):
    """lightning-hydra-template's ckpt_path=<run>/last.ckpt resumes; runner's starts from the weights:
    said once, naming the resume= that continues the run (best.pt, a usual fine-tune, says nothing)."""
    import logging

    from conftest import compose
    from runner.config import rules, typed

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("{}\n")
    (run / "checkpoints").mkdir()
    for name in ("last.pt", "best.pt"):
        (run / "checkpoints" / name).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="runner"):
        rules.warn_fine_tune_of_last(typed(compose("experiment=regression", f"ckpt_path={run / 'checkpoints' / 'best.pt'}")))
        assert caplog.text == ""
        rules.warn_fine_tune_of_last(typed(compose("experiment=regression", f"ckpt_path={run / 'checkpoints' / 'last.pt'}")))
    assert f"to continue that run in its folder use resume={run}" in caplog.text
