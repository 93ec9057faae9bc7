"""A run's title and folder name follow its own choices (runner/names.py); `--help` introduces
runner and lists the groups, their options and the presets."""
from __future__ import annotations

import pytest
from hydra.core.hydra_config import HydraConfig

from conftest import compose, run_cli
from runner.runs.names import MAX_LENGTH, run_title

GROUPS = ("dataset", "model", "loss", "optim", "schedule", "trainer", "device", "logger", "experiment",
          "hydra/launcher")


@pytest.mark.parametrize("overrides, title", [
    ([], "focal_densenet"),
    (["loss=bce", "trainer.seed=1", "optim.lr=0.01"], "focal_densenet-loss-bce"),  # groups only
    (["experiment=focal_densenet", "device=cpu", "logger=[csv,mlflow]", "hydra/launcher=parallel"], "focal_densenet"),
    (["+model=timm", "schedule=one_cycle"], "focal_densenet-model-timm-schedule-one_cycle"),
    (["loss=my loss/v2"], "focal_densenet-loss-my_loss_v2"),  # file-system safe, and no "=": resume=<folder> parses
])
def test_title_is_the_name_plus_the_group_overrides(overrides, title):
    assert run_title("focal_densenet", overrides, GROUPS) == title
    assert run_title("mine", ["name=mine", *overrides], GROUPS) == "mine"  # a name given is the title


def test_long_titles_are_cut_and_stay_distinct():
    many = [f"dataset=a_very_long_dataset_option_name_{i}" for i in range(2)]
    first = run_title("focal_densenet", [many[0], "loss=bce_pos_weight", "optim=adamw"], GROUPS)
    second = run_title("focal_densenet", [many[1], "loss=bce_pos_weight", "optim=adamw"], GROUPS)
    assert len(first) == len(second) == MAX_LENGTH and first != second
    assert first.startswith("focal_densenet-dataset-a_very_long")


def test_the_run_folder_ends_with_the_title(tmp_path):
    cfg = compose("experiment=regression", "optim=adam", "device=cpu", "trainer.max_epochs=1",
                  f"output_root={tmp_path}", with_hydra=True)
    HydraConfig.instance().set_config(cfg)  # as Hydra does before it resolves the run folder
    try:
        run_dir = cfg.hydra.run.dir
    finally:
        HydraConfig.instance().cfg = None
    assert run_dir.startswith(str(tmp_path / "runs")) and run_dir.endswith("_regression-optim-adam")


def test_help_introduces_runner_and_lists_groups_and_presets():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("runner: a configuration-driven experiment runner for PyTorch")
    assert "powered by Hydra" not in text
    assert "logger: csv, mlflow, tensorboard, wandb" in text
    presets = next(line for line in text.splitlines() if line.startswith("experiment: "))
    assert "focal_densenet" in presets and "iwae_mnist" in presets and "regression" in presets
    assert "loss: " in text and "optim: adam, adamw, sgd" in text
