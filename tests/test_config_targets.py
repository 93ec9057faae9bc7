"""A ``_target_`` changed on the command line starts its node clean (runner/config/targets.py):
the preset's keys the new target does not take are dropped and the run trains with the new
target; a key the user gave that the target refuses still exits 2, naming it."""
from __future__ import annotations

import inspect
import json

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from conftest import compose
from runner.config import typed
from runner.config.targets import drop_preset_keys

REG = ("experiment=regression", "device=cpu", "trainer.progress=none", "trainer.max_epochs=1")
EXPONENTIAL = ("schedule._target_=torch.optim.lr_scheduler.ExponentialLR", "+schedule.gamma=0.9",
               "schedule.interval=epoch")  # README.md's command, as written


def run_as_prepared(tmp_path, *overrides):
    """Compose, drop the preset keys, type and run, as runner/job.py prepare_job does (the
    dropping there is prepared_config's first step)."""
    from runner.engine.run import run

    cfg = compose(*overrides, with_hydra=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    dropped = drop_preset_keys(cfg, overrides, choices)
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run(typed(cfg), run_dir, choices), run_dir, dropped


def rows(run_dir, split="train"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_the_readme_exponential_schedule_runs_with_its_gamma(tmp_path):
    code, run_dir, dropped = run_as_prepared(tmp_path, *REG, *EXPONENTIAL, "trainer.max_epochs=3")
    assert code == 0, json.loads((run_dir / "summary.json").read_text())["error"]
    assert sorted(dropped) == ["schedule.factor", "schedule.total_iters"]  # ConstantLR's, in constant.yaml
    by_epoch = {r["epoch"]: r["lr"] for r in rows(run_dir)}
    assert [by_epoch[e] for e in (0, 1, 2)] == pytest.approx([0.05, 0.05 * 0.9, 0.05 * 0.9**2])  # optim.lr 0.05


def test_radam_on_the_sgd_preset_drops_the_momentum_and_keeps_the_lr(tmp_path):
    code, run_dir, dropped = run_as_prepared(tmp_path, *REG, "optim._target_=torch.optim.RAdam")
    assert code == 0 and sorted(dropped) == ["optim.momentum", "optim.nesterov"]
    group = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert "momentum" not in group and "decoupled_weight_decay" in group  # RAdam's own hyperparameters
    assert group["lr"] == 0.05  # the experiment's lr: SGD and RAdam give lr the same default, so it carries


def test_one_cycle_on_the_cosine_preset_follows_torch(tmp_path):
    code, run_dir, dropped = run_as_prepared(tmp_path, *REG, "schedule=cosine",
                                             "schedule._target_=torch.optim.lr_scheduler.OneCycleLR",
                                             "+schedule.max_lr=0.1")
    assert code == 0 and dropped == ["schedule.eta_min"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05, momentum=0.9)
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=16)  # 256 / 16 per epoch
    expected = {}
    for step in range(1, 17):
        optimizer.step()
        reference.step()
        expected[step] = optimizer.param_groups[0]["lr"]
    assert {r["step"]: r["lr"] for r in rows(run_dir)} == pytest.approx({s: expected[s] for s in (4, 8, 12, 16)})


def test_plateau_on_the_constant_preset_gets_its_own_factor(tmp_path):
    """ConstantLR's factor (1.0 in constant.yaml) is not ReduceLROnPlateau's: the two targets give
    it other defaults, so it is dropped rather than carried (Plateau refuses a factor of 1)."""
    code, run_dir, dropped = run_as_prepared(tmp_path, *REG, "schedule._target_=torch.optim.lr_scheduler.ReduceLROnPlateau")
    assert code == 0 and sorted(dropped) == ["schedule.factor", "schedule.total_iters"]
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["schedule"]["scheduler"]
    assert state["factor"] == inspect.signature(torch.optim.lr_scheduler.ReduceLROnPlateau).parameters["factor"].default


@pytest.mark.parametrize("overrides, needle", [
    (("optim._target_=torch.optim.RAdam", "optim.momentum=0.9"), "unknown key 'optim.momentum'; allowed keys of optim:"),
    (("schedule._target_=torch.optim.lr_scheduler.ExponentialLR", "+schedule.gama=0.9"),
     "unknown key 'schedule.gama' (did you mean 'gamma'?)"),
])
def test_a_key_the_user_gave_is_still_refused(tmp_path, overrides, needle):
    code, run_dir, dropped = run_as_prepared(tmp_path, *REG, *overrides)
    error = json.loads((run_dir / "summary.json").read_text())["error"]
    assert code == 2 and needle in error and "\n" not in error, error
    assert all(not d.endswith((".momentum", ".gama")) for d in dropped)


def test_without_the_old_target_a_key_the_new_one_names_is_kept():
    """An option of a user's --config-dir (its target unknown here): the name alone decides."""
    cfg = compose("optim=adam", "optim._target_=torch.optim.AdamW")
    assert drop_preset_keys(cfg, ["optim._target_=torch.optim.AdamW"], choices=None) == []
    cfg = compose("optim=adam", "optim._target_=torch.optim.AdamW")
    # Known old target: Adam's weight_decay (coupled, default 0) is not AdamW's (decoupled, 0.01).
    assert drop_preset_keys(cfg, ["optim._target_=torch.optim.AdamW"], {"optim": "adam"}) == ["optim.weight_decay"]
    assert cfg.optim.lr == 1e-3 and list(cfg.optim.betas) == [0.9, 0.999] and cfg.optim.decay_bias_and_norm


def test_the_saved_config_is_the_one_that_ran(tmp_path):
    """resume= and mode=eval read .hydra/config.yaml: it holds the node without the dropped keys."""
    from runner.config.prepare import prepared_config

    saved = tmp_path / ".hydra" / "config.yaml"
    saved.parent.mkdir()
    cfg = compose(*REG, *EXPONENTIAL)
    OmegaConf.save(cfg, saved)
    prepared_config(cfg, EXPONENTIAL, {"schedule": "constant"}, tmp_path)
    assert "factor" not in OmegaConf.load(saved).schedule and OmegaConf.load(saved).schedule.gamma == 0.9


def test_the_readme_command_through_the_api(tmp_path):
    from runner import run

    result = run([*REG, *EXPONENTIAL, f"output_root={tmp_path}"])
    assert result["exit_code"] == 0, result.get("error")
