"""Exact accumulation (DESIGN.md): batch 4 x 10 micro-batches gives the update of batch 40,
also with a shorter last window and a smaller last batch."""
from __future__ import annotations

import logging

import pytest
import torch

from conftest import run_in_process

FAST = ("experiment=regression", "trainer.progress=none", "device=cpu", "optim=sgd", "optim.lr=0.1",
        "optim.momentum=0.0", "trainer.log_every_n_steps=1")


def final_weights(tmp_path, *overrides):
    code, run_dir = run_in_process(tmp_path, *FAST, *overrides)
    assert code == 0
    payload = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return payload["model"], payload["loop"]


def hand_sgd_step(model, x, y, lr):
    """The reference: one full-batch SGD step on the mean squared error, written by hand."""
    loss = ((model(x) - y) ** 2).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= lr * g


@pytest.mark.parametrize("n_train, steps", [(40, 1), (50, 2)])
def test_accumulated_micro_batches_equal_one_large_batch(tmp_path, n_train, steps):
    common = (f"dataset.n_train={n_train}", "trainer.max_epochs=1")
    big, big_loop = final_weights(tmp_path / "big", *common, "trainer.batch_size=40")
    small, small_loop = final_weights(tmp_path / "small", *common, "trainer.batch_size=4",
                                      "trainer.accumulate_grad_batches=10")
    assert big_loop["step"] == small_loop["step"] == steps
    assert big_loop["samples_seen"] == small_loop["samples_seen"] == n_train
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-6, atol=1e-7)


def test_update_equals_hand_written_full_batch_step(tmp_path):
    """Against an independent reference: 50 samples, window of 40 then a short window of 10
    (batches 4,4,2) equals two hand-written SGD steps on the same samples in the same order."""
    from runner.engine.data import train_order
    from runner.families.regression import mlp, synthetic

    ours, _ = final_weights(tmp_path, "dataset.n_train=50", "trainer.max_epochs=1", "trainer.batch_size=4",
                            "trainer.accumulate_grad_batches=10")
    torch.manual_seed(0)  # the engine seeds with trainer.seed=0 before building the model
    bundle = synthetic(n_train=50, n_val=64, n_test=64, dim=8, noise=0.1, seed=0)
    model = mlp(8, hidden=16)
    x, y = bundle.train.tensors
    order = train_order(50, seed=0, epoch=0)
    hand_sgd_step(model, x[order[:40]], y[order[:40]], 0.1)
    hand_sgd_step(model, x[order[40:]], y[order[40:]], 0.1)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-6)


def test_batchnorm_warning_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="runner"):
        code, _ = run_in_process(tmp_path, *FAST, "model.batchnorm=true", "trainer.batch_size=4",
                                 "trainer.accumulate_grad_batches=4", "trainer.max_epochs=2")
    assert code == 0
    warnings = [r for r in caplog.records if "BatchNorm" in r.getMessage()]
    assert len(warnings) == 1


def test_device_resident_batches_match_the_data_loader(tmp_path):
    """trainer.data_on_device cuts the same seeded batches on the device as the DataLoader."""
    a, _ = final_weights(tmp_path / "loader", "trainer.max_epochs=2", "dataset.n_train=50", "trainer.batch_size=8")
    b, _ = final_weights(tmp_path / "device", "trainer.max_epochs=2", "dataset.n_train=50", "trainer.batch_size=8",
                         "trainer.data_on_device=true")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_device_resident_evaluation_matches_the_data_loader(tmp_path):
    from conftest import run_in_process
    import json

    results = []
    for sub, extra in (("loader", ()), ("device", ("trainer.data_on_device=true",))):
        code, run_dir = run_in_process(tmp_path / sub, *FAST, "dataset.n_val=101", "trainer.eval_batch_size=16", *extra)
        assert code == 0
        results.append(json.loads((run_dir / "summary.json").read_text()))
    assert results[0]["eval_samples"] == results[1]["eval_samples"] == {"val": 101, "test": 64}
    assert results[0]["metrics"] == results[1]["metrics"]


def test_stacked_resident_batches_are_the_next_batches():
    """ResidentEpoch.take(n) (the batches of n captured steps in one launch) gives exactly the
    n batches that n calls of next() give, in order; the partial last batch stays single."""
    from torch.utils.data import TensorDataset

    from runner.engine.data import DeviceBatches

    dataset = TensorDataset(torch.arange(50.0).view(25, 2), torch.arange(25))
    source = DeviceBatches(dataset, torch.device("cpu"))
    common = dict(batch_size=4, epoch=3, seed=7, rank=0, world=1, weights=None)
    one_by_one, stacked = source.epoch(**common), source.epoch(**common)
    first = stacked.take(3)
    assert first[0].shape == (3, 4, 2) and first[1].shape == (3, 4)
    for s in range(3):
        x, y = next(one_by_one)
        assert torch.equal(first[0][s], x) and torch.equal(first[1][s], y)
    assert stacked.full_batches_left() == 3  # 25 samples: 6 full batches of 4, then 1
    rest_stacked, rest = [stacked.take(3)], list(one_by_one)
    assert [b[1].shape[0] for b in rest] == [4, 4, 4, 1]
    assert torch.equal(rest_stacked[0][1].flatten(), torch.cat([b[1] for b in rest[:3]]))
    assert torch.equal(next(stacked)[1], rest[3][1])


def test_schedule_constant_for_counts_the_lr_changes_ahead():
    from omegaconf import OmegaConf

    from runner.schedule import Schedule

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    schedule = Schedule(opt, OmegaConf.load("runner/conf/schedule/step.yaml"), steps_per_epoch=10, total_steps=100)
    # Per epoch: the lr changes only between epochs, which launches never span.
    assert schedule.constant_for(10)
    per_step = Schedule(opt, OmegaConf.load("runner/conf/schedule/cosine.yaml"), steps_per_epoch=10, total_steps=100)
    assert per_step.constant_for(1) and not per_step.constant_for(2)
    warming = Schedule(opt, OmegaConf.merge(OmegaConf.load("runner/conf/schedule/step.yaml"), {"warmup_steps": 3}),
                       steps_per_epoch=10, total_steps=100)
    assert not warming.constant_for(2)
    for _ in range(3):
        warming.step_end()
    assert warming.constant_for(5)


def test_steps_per_graph_needs_the_captured_resident_path(tmp_path):
    from conftest import rejected

    code, error = rejected(tmp_path, *FAST, "trainer.steps_per_graph=4")
    assert code == 2
    assert "trainer.steps_per_graph=4 needs trainer.cuda_graph=true and trainer.data_on_device=true" in error
