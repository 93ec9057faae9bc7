"""Schedules and optimizers against hand-computed values; seeds and determinism."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import run_in_process
from runner.config import ScheduleConfig, ScheduleName
from runner.optim import iwae_paper_epochs, iwae_paper_stage, lr_multiplier


def test_step_decay_is_x0_1_per_epoch():
    f = lr_multiplier(ScheduleConfig(name=ScheduleName.step), steps_per_epoch=10, total_steps=50)
    assert [f(s) for s in (0, 9, 10, 19, 20, 35)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001])


def test_cosine_endpoints_and_midpoint():
    f = lr_multiplier(ScheduleConfig(name=ScheduleName.cosine, min_lr_ratio=0.1), steps_per_epoch=10, total_steps=100)
    assert f(0) == pytest.approx(1.0)
    assert f(50) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(100) == pytest.approx(0.1)


def test_warmup_is_linear():
    f = lr_multiplier(ScheduleConfig(name=ScheduleName.constant, warmup_steps=4), steps_per_epoch=10, total_steps=100)
    assert [f(s) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])


def test_iwae_paper_schedule_matches_the_paper():
    assert iwae_paper_epochs(7) == 3280
    # stage i covers 3^i passes: epochs 0 | 1-3 | 4-12 | 13-39 ...
    assert [iwae_paper_stage(e) for e in (0, 1, 3, 4, 12, 13, 39, 40, 3279)] == [0, 1, 1, 2, 2, 3, 3, 4, 7]
    f = lr_multiplier(ScheduleConfig(name=ScheduleName.iwae_paper), steps_per_epoch=3000, total_steps=3280 * 3000)
    for epoch, stage in ((0, 0), (2, 1), (12, 2), (3279, 7)):
        assert f(epoch * 3000) == pytest.approx(10 ** (-stage / 7))
    assert f(3279 * 3000) * 1e-3 == pytest.approx(1e-4)


def test_max_epochs_null_follows_the_schedule(tmp_path):
    code, run_dir = run_in_process(tmp_path, "experiment=regression", "trainer.progress=none", "schedule=iwae_paper",
                                   "schedule.last_stage=1", "trainer.max_epochs=null", "dataset.n_train=32")
    assert code == 0
    payload = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert payload["loop"]["epoch"] == 1 + 3
    # The optimizer holds the lr of the next step: epoch 4 would open stage 2.
    lr = payload["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(0.05 * 10 ** (-2 / 7))


@pytest.mark.parametrize("optim", ["adam", "adamw", "sgd"])
def test_each_optimizer_trains(tmp_path, optim):
    code, run_dir = run_in_process(tmp_path, "experiment=regression", "trainer.progress=none", f"optim={optim}",
                                   "optim.lr=0.01", "trainer.max_epochs=3")
    assert code == 0


def test_deterministic_runs_are_bitwise_identical_and_seeds_differ(tmp_path):
    def weights(sub, *extra):
        code, run_dir = run_in_process(tmp_path / sub, "experiment=regression", "trainer.progress=none",
                                       "trainer.deterministic=true", *extra)
        assert code == 0
        return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]

    a, b, c = weights("a"), weights("b"), weights("c", "trainer.seed=1")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_reduced_precision_runs_and_stays_close(tmp_path, precision):
    code, run_dir = run_in_process(tmp_path, "experiment=regression", "trainer.progress=none",
                                   f"trainer.precision={precision}", "trainer.gradient_clip_val=1.0")
    assert code == 0
    import json
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and math.isfinite(summary["metrics"]["test/loss"])



def test_tf32_is_set_per_run_and_evaluation_multiplies_in_full_fp32(tmp_path, monkeypatch):
    """precision=tf32 turns TF32 matrix products on for the run (on the CPU the flag is set but
    unused), precision=32 turns them off again, and every evaluation runs with them off."""
    import contextlib

    from runner.engine import loop

    flags_in_evaluation = []
    real = loop.full_fp32_matmul

    @contextlib.contextmanager
    def recording():
        with real():
            flags_in_evaluation.append(torch.backends.cuda.matmul.allow_tf32)
            yield

    monkeypatch.setattr(loop, "full_fp32_matmul", recording)
    code, _ = run_in_process(tmp_path / "a", "experiment=regression", "trainer.progress=none", "trainer.precision=tf32")
    assert code == 0 and torch.backends.cuda.matmul.allow_tf32 is True  # restored after each evaluation
    assert len(flags_in_evaluation) >= 2 and not any(flags_in_evaluation)
    code, _ = run_in_process(tmp_path / "b", "experiment=regression", "trainer.progress=none")
    assert code == 0 and torch.backends.cuda.matmul.allow_tf32 is False
