"""A run's title and folder name follow its own choices (runner/names.py); `--help` introduces
runner and lists the groups, their options and the presets."""
from __future__ import annotations

import pytest
from hydra.core.hydra_config import HydraConfig

from conftest import compose, run_cli
from runner.runs.names import MAX_LENGTH, run_title

GROUPS = ("dataset", "model", "loss", "optim", "schedule", "trainer", "device", "logger", "experiment",
          "hydra/launcher", "callbacks", "debug", "paths")


@pytest.mark.parametrize("overrides, title", [
    ([], "focal_densenet"),
    (["loss=bce", "trainer.seed=1", "optim.lr=0.01"], "focal_densenet-loss-bce-seed1-lr0.01"),
    (["experiment=focal_densenet", "device=cpu", "logger=[csv,mlflow]", "hydra/launcher=parallel"], "focal_densenet"),
    (["+model=timm", "schedule=one_cycle"], "focal_densenet-model-timm-schedule-one_cycle"),
    (["loss=my loss/v2"], "focal_densenet-loss-my_loss_v2"),  # file-system safe, and no "=": resume=<folder> parses
    # what does not change what is learned stays out: bookkeeping, speed, where the data are, devices, loggers
    (["trainer.progress=plain", "trainer.num_workers=2", "+trainer.compile=true", "dataset.root=/data/x",
      "device.devices=2", "logger.mlflow.tracking_uri=x", "callbacks.early_stopping.patience=2", "tags=[a]",
      "resume=/r", "paths.data_dir=/d", "~model.dropout", "callbacks=none"], "focal_densenet"),
    (["loss.k=5", "+model.dropout=0.2", "trainer.max_epochs=3", "trainer.early_stopping.patience=4", "debug=fdr"],
     "focal_densenet-k5-dropout0.2-max_epochs3-patience4-debug-fdr"),
])
def test_title_is_the_name_plus_what_the_overrides_change(overrides, title):
    assert run_title("focal_densenet", overrides, GROUPS) == title
    assert run_title("mine", ["name=mine", *overrides], GROUPS) == "mine"  # a name given is the title


def test_long_titles_are_cut_and_stay_distinct():
    many = [f"dataset=a_very_long_dataset_option_name_{i}" for i in range(2)]
    first = run_title("focal_densenet", [many[0], "loss=bce_pos_weight", "optim=adamw"], GROUPS)
    second = run_title("focal_densenet", [many[1], "loss=bce_pos_weight", "optim=adamw"], GROUPS)
    assert len(first) == len(second) == MAX_LENGTH and first != second
    assert first.startswith("focal_densenet-dataset-a_very_long")


@pytest.mark.parametrize("sweep, suffixed", [
    (["experiment=regression", "trainer.seed=0,1", "optim=sgd,adam"], False),  # every swept key is in the title
    (["experiment=regression", "trainer.seed=0", "trainer.num_workers=0,2"], True),  # only a key that stays out
])
def test_sweep_jobs_titled_alike_get_their_job_number(tmp_path, sweep, suffixed):
    from omegaconf import OmegaConf

    from runner.runs.names import sweep_jobs, unique_title

    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": sweep}}}), tmp_path / "multirun.yaml")
    jobs = sweep_jobs(tmp_path)  # as Hydra's basic sweeper expands them
    assert len(jobs) == (4 if not suffixed else 2)
    titles = [unique_title("regression", job, GROUPS, tmp_path, str(n)) for n, job in enumerate(jobs)]
    assert len(set(titles)) == len(titles)
    plain = [run_title("regression", job, GROUPS) for job in jobs]
    assert titles == ([f"{t}-{n}" for n, t in enumerate(plain)] if suffixed else plain)
    assert unique_title("regression", jobs[0], GROUPS, None, "0") == plain[0]  # a run alone: no number


def test_the_run_folder_ends_with_the_title(tmp_path):
    cfg = compose("experiment=regression", "optim=adam", "device=cpu", "trainer.max_epochs=1", "trainer.seed=1",
                  "trainer.progress=none", f"output_root={tmp_path}", with_hydra=True)
    HydraConfig.instance().set_config(cfg)  # as Hydra does before it resolves the run folder
    try:
        run_dir = cfg.hydra.run.dir
    finally:
        HydraConfig.instance().cfg = None
    assert run_dir.startswith(str(tmp_path / "runs")) and run_dir.endswith("_regression-optim-adam-max_epochs1-seed1")


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
