"""Schedules and optimizers against hand-computed values; seeds and determinism."""
from __future__ import annotations

import math

import pytest
import torch

from omegaconf import OmegaConf

from conftest import ROOT, run_in_process
from runner.schedule import Schedule, iwae_paper_epochs, iwae_paper_stage


def schedule_lrs(option: str, steps: int, steps_per_epoch: int, total_steps: int, lr: float = 1.0, **overrides) -> list[float]:
    """The lr of each of ``steps`` optimizer steps under conf/schedule/<option>.yaml, driven as the
    loop drives it (step_end after every step, epoch_end after every epoch)."""
    node = OmegaConf.merge(OmegaConf.load(ROOT / "runner" / "conf" / "schedule" / f"{option}.yaml"), overrides)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = Schedule(optimizer, node, steps_per_epoch, total_steps)
    lrs = []
    for step in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        schedule.step_end()
        if (step + 1) % steps_per_epoch == 0:
            schedule.epoch_end()
    return lrs


def test_step_decay_is_x0_1_per_epoch():
    lrs = schedule_lrs("step", 36, steps_per_epoch=10, total_steps=50)
    assert [lrs[s] for s in (0, 9, 10, 19, 20, 35)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001])


def test_cosine_endpoints_and_midpoint():
    lrs = schedule_lrs("cosine", 101, steps_per_epoch=10, total_steps=100, eta_min=0.1)
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[50] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lrs[25] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lrs[100] == pytest.approx(0.1)


def test_warmup_is_linear():
    lrs = schedule_lrs("constant", 6, steps_per_epoch=10, total_steps=100, warmup_steps=4)
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])


def test_warmup_multiplies_the_schedule():
    lrs = schedule_lrs("step", 14, steps_per_epoch=5, total_steps=20, warmup_steps=8)
    assert lrs[3] == pytest.approx(4 / 8) and lrs[5] == pytest.approx(6 / 8 * 0.1) and lrs[10] == pytest.approx(0.01)


def test_one_cycle_gets_the_run_length_and_matches_torch():
    """OneCycleLR's total_steps is filled from the run; the lrs are torch's own."""
    ours = schedule_lrs("one_cycle", 30, steps_per_epoch=10, total_steps=30, lr=0.01, max_lr=0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01, momentum=0.9)
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=30, pct_start=0.3)
    expected = []
    for _ in range(30):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert ours == pytest.approx(expected, rel=1e-12)


def test_iwae_paper_schedule_matches_the_paper():
    assert iwae_paper_epochs(7) == 3280
    # stage i covers 3^i passes: epochs 0 | 1-3 | 4-12 | 13-39 ...
    assert [iwae_paper_stage(e) for e in (0, 1, 3, 4, 12, 13, 39, 40, 3279)] == [0, 1, 1, 2, 2, 3, 3, 4, 7]
    lrs = schedule_lrs("iwae_paper", 41 * 3, steps_per_epoch=3, total_steps=3280 * 3, lr=1e-3)
    for epoch, stage in ((0, 0), (2, 1), (12, 2), (13, 3), (40, 4)):
        assert lrs[epoch * 3] == pytest.approx(1e-3 * 10 ** (-stage / 7))
    assert 1e-3 * 10 ** (-iwae_paper_stage(3279) / 7) == pytest.approx(1e-4)
    # base 2, the practitioners' shorter schedule: 2^i passes, epochs 0 | 1-2 | 3-6 | ... | 127-254
    assert iwae_paper_epochs(7, base=2) == 255
    assert [iwae_paper_stage(e, base=2) for e in (0, 1, 2, 3, 6, 7, 127, 254)] == [0, 1, 1, 2, 2, 3, 7, 7]


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

    from runner.engine import evaluate

    flags_in_evaluation = []
    real = evaluate.full_fp32_matmul

    @contextlib.contextmanager
    def recording():
        with real():
            flags_in_evaluation.append(torch.backends.cuda.matmul.allow_tf32)
            yield

    monkeypatch.setattr(evaluate, "full_fp32_matmul", recording)
    code, _ = run_in_process(tmp_path / "a", "experiment=regression", "trainer.progress=none", "trainer.precision=tf32")
    assert code == 0 and torch.backends.cuda.matmul.allow_tf32 is True  # restored after each evaluation
    assert len(flags_in_evaluation) >= 2 and not any(flags_in_evaluation)
    code, _ = run_in_process(tmp_path / "b", "experiment=regression", "trainer.progress=none")
    assert code == 0 and torch.backends.cuda.matmul.allow_tf32 is False
