"""mode=eval / mode=predict take the config of the run that wrote the checkpoint
(runner/config/from_checkpoint.py): without repeating experiment= they evaluate that run's model
on that run's data, with only the command line's keys on top."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from conftest import compose, only_run_folder, run_cli
from runner.config import typed
from runner.config.from_checkpoint import config_for_checkpoint

QUIET = ("device=cpu", "trainer.progress=none")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A REG run (through the API: it writes .hydra/ as the command line does) whose test split
    is not the default's size, so that a config not taken from the run shows."""
    from runner import run

    result = run(["experiment=regression", *QUIET, "dataset.n_test=50", "model.hidden=12",
                  f"output_root={tmp_path_factory.mktemp('train')}"])
    assert result["exit_code"] == 0
    return result


def run_as_prepared(tmp_path, *overrides):
    """Compose the command line, save it as Hydra does, take the checkpoint's config, type and
    run, as runner/job.py prepare_job does."""
    from runner.config.prepare import prepared_config
    from runner.engine.run import run

    cfg = compose(*overrides, with_hydra=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    code = run(typed(prepared_config(cfg, overrides, choices, run_dir)), run_dir, choices)
    return code, run_dir, json.loads((run_dir / "summary.json").read_text())


def best(result):
    return f"ckpt_path={result['run_dir']}/checkpoints/best.pt"


def test_eval_without_the_experiment_gives_the_runs_own_test_metrics(tmp_path, trained):
    code, run_dir, summary = run_as_prepared(tmp_path, "mode=eval", best(trained), *QUIET)
    assert code == 0, summary.get("error")
    assert summary["eval_samples"] == {"val": 64, "test": 50}  # the run's dataset.n_test, not the default's
    assert summary["metrics"]["test/loss"] == trained["metrics"]["test/loss"]  # best.pt tested both times
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").model.hidden == 12  # the folder says what ran


def test_predict_without_the_experiment_predicts_with_the_runs_model(tmp_path, trained):
    from runner.families.regression import mlp, synthetic

    code, run_dir, summary = run_as_prepared(tmp_path, "mode=predict", best(trained), *QUIET)
    assert code == 0, summary.get("error")
    model = mlp(8, hidden=12)
    model.load_state_dict(torch.load(f"{trained['run_dir']}/checkpoints/best.pt", weights_only=True)["model"])
    x, _ = synthetic(n_train=256, n_val=64, n_test=50, dim=8, noise=0.1, seed=0).test.tensors
    with torch.no_grad():
        expected = model(x)[:, 0].numpy()
    assert pd.read_csv(run_dir / "predictions.csv")["prediction"].to_numpy() == pytest.approx(expected, abs=1e-5)


def test_the_command_lines_keys_apply_on_top(tmp_path, trained):
    """New data (dataset.*), the evaluation batch and the folder are the command line's."""
    cfg = compose("mode=eval", best(trained), *QUIET, "dataset.n_test=20", "trainer.eval_batch_size=7",
                  f"output_root={tmp_path}")
    taken = config_for_checkpoint(cfg, ["mode=eval", best(trained), *QUIET, "dataset.n_test=20",
                                        "trainer.eval_batch_size=7", f"output_root={tmp_path}"])
    assert taken.model.hidden == 12 and taken.name == "regression"  # the run's own
    assert taken.dataset.n_test == 20 and taken.trainer.eval_batch_size == 7 and taken.output_root == str(tmp_path)
    assert str(taken.mode.value if hasattr(taken.mode, "value") else taken.mode) == "eval"


def test_a_checkpoint_outside_its_run_folder_carries_its_config(tmp_path, trained):
    copy = tmp_path / "elsewhere" / "best.pt"
    copy.parent.mkdir()
    shutil.copy(f"{trained['run_dir']}/checkpoints/best.pt", copy)
    code, _, summary = run_as_prepared(tmp_path, "mode=eval", f"ckpt_path={copy}", *QUIET)
    assert code == 0, summary.get("error")
    assert summary["metrics"]["test/loss"] == trained["metrics"]["test/loss"]


def test_a_named_experiment_and_training_keep_the_command_lines_config(trained):
    for overrides in (("mode=eval", best(trained), "experiment=regression"), ("mode=train", best(trained))):
        cfg = compose(*overrides)
        assert config_for_checkpoint(cfg, overrides) is cfg


@pytest.mark.parametrize("mode", ["eval", "predict"])
def test_eval_and_predict_through_the_api(tmp_path, trained, mode):
    from runner import run

    result = run([f"mode={mode}", best(trained), *QUIET, f"output_root={tmp_path}"])
    assert result["exit_code"] == 0, result.get("error")
    if mode == "eval":
        assert result["metrics"]["test/loss"] == trained["metrics"]["test/loss"]


@pytest.mark.slow  # ~20 s: the command line's start-up
def test_the_readme_eval_command(tmp_path, trained):
    done = run_cli("mode=eval", best(trained), f"output_root={tmp_path}", "trainer.progress=none")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((only_run_folder(tmp_path) / "summary.json").read_text())
    assert summary["metrics"]["test/loss"] == trained["metrics"]["test/loss"]
