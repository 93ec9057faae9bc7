"""Fused sweeps (hydra/launcher=fused): jobs of the same shapes train as one batched model, and each
equals the same job run alone; a NaN job fails alone; an interrupted group resumes exactly."""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from conftest import ROOT, relative_difference, run_cli, run_in_process

REGRESSION = ["experiment=regression", "device=cpu", "trainer.progress=none", "trainer.max_epochs=3"]
# 20 steps: IWAE's training amplifies float rounding (a 1-ulp change of every weight of a run
# alone grows to 3e-6 after 50 steps and 4e-3 after 100; the fused run differs from the run alone
# by the same amount), so the exact comparison is made early.
IWAE = ["experiment=iwae_silhouettes", "device=cpu", "trainer.progress=none", "dataset.n_train=200",
        "dataset.n_val=20", "dataset.n_test=20", "trainer.batch_size=20", "loss.eval_k=10", "loss.k=5",
        "trainer.max_epochs=2", "trainer.max_steps=20"]


def sweep(tmp_path, *args):
    done = run_cli("-m", "hydra/launcher=fused", *args, f"output_root={tmp_path}")
    (folder,) = (tmp_path / "multirun").iterdir()
    return done, folder


def last(folder):
    return torch.load(folder / "checkpoints" / "last.pt", weights_only=True)


def assert_same_as_alone(fused, alone, tolerance):
    assert fused["loop"] == alone["loop"]  # same steps, same data position, same stop
    for name in ("checkpoints", "early_stopping"):  # the callbacks' best val/loss: a float of the run
        mine, theirs = fused["callbacks"][name], alone["callbacks"][name]
        assert mine.pop("best") == pytest.approx(theirs.pop("best"), rel=tolerance) and mine == theirs
    assert relative_difference(fused["model"], alone["model"]) <= tolerance
    assert torch.equal(fused["rng"]["torch"], alone["rng"]["torch"])  # the job's own random stream, as alone
    assert fused["model"].keys() == alone["model"].keys()
    for name, tensor in fused["model"].items():  # a job's file holds its own tensors, not the group's stack
        assert tensor.untyped_storage().nbytes() == tensor.nbytes, name
    # The optimizer state too (a group of one optimizer setting steps one stacked optimizer).
    ours, theirs = fused["optimizer"]["state"], alone["optimizer"]["state"]
    assert ours.keys() == theirs.keys() and len(theirs) > 0
    for index, state in theirs.items():
        assert ours[index].keys() == state.keys()
        for key, value in state.items():
            if key == "step":
                assert torch.equal(ours[index][key], value)
            else:  # the moments carry the batched products' rounding of the gradients (~2e-5 after 20 steps)
                assert relative_difference({key: ours[index][key]}, {key: value}) <= 10 * tolerance, (index, key)
                assert ours[index][key].untyped_storage().nbytes() == ours[index][key].nbytes, (index, key)


def test_fused_regression_jobs_equal_their_runs_alone(tmp_path):
    done, folder = sweep(tmp_path, *REGRESSION, "trainer.seed=0,1", "optim.lr=0.01,0.02")
    assert done.returncode == 0, done.stderr[-2000:]
    table = pd.read_csv(folder / "summary.csv")
    assert list(table["status"]) == ["completed"] * 4
    assert "fused group of 4 jobs (each job steps its own optimizer" in (folder / "0" / "run.log").read_text()
    for job, (seed, lr) in [(3, (1, 0.02))]:  # one of the four, to keep the test short
        code, alone = run_in_process(tmp_path / f"alone{job}", *REGRESSION, f"trainer.seed={seed}", f"optim.lr={lr}")
        assert code == 0
        assert_same_as_alone(last(folder / str(job)), last(alone), 1e-5)
        fused_metrics = json.loads((folder / str(job) / "summary.json").read_text())["metrics"]
        alone_metrics = json.loads((alone / "summary.json").read_text())["metrics"]
        assert fused_metrics == pytest.approx(alone_metrics, rel=1e-5)


def test_fused_iwae_and_vae_jobs_equal_their_runs_alone_and_dreg_runs_unfused(tmp_path):
    done, folder = sweep(tmp_path, *IWAE, "loss=iwae,elbo,dreg", "trainer.seed=3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fused group of 2 jobs (one optimizer over the stack)" in (folder / "0" / "run.log").read_text()
    assert "job 2 runs alone: loss=dreg does not fuse" in done.stderr
    assert list(pd.read_csv(folder / "summary.csv")["status"]) == ["completed"] * 3
    for job, loss in enumerate(("iwae", "elbo")):
        code, alone = run_in_process(tmp_path / loss, *IWAE, f"loss={loss}", "trainer.seed=3")
        assert code == 0
        assert_same_as_alone(last(folder / str(job)), last(alone), 1e-5)


def test_iwae_jobs_of_different_k_fuse_padded_and_equal_their_runs_alone(tmp_path):
    # Job 0 (k=2) leads the group and runs at k=5 with its last three draws zero: its loss must
    # read its own two rows of log w only. The lr changes every step (cosine): the group's one
    # optimizer must take it from the jobs' schedules.
    done, folder = sweep(tmp_path, *IWAE, "loss=iwae", "loss.k=2,5", "trainer.seed=4", "schedule=cosine")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fused group of 2 jobs (one optimizer over the stack)" in (folder / "0" / "run.log").read_text()
    code, alone = run_in_process(tmp_path / "alone", *IWAE, "loss=iwae", "loss.k=2", "trainer.seed=4",
                                 "schedule=cosine")
    assert code == 0
    assert_same_as_alone(last(folder / "0"), last(alone), 1e-5)


def test_a_nan_job_fails_alone(tmp_path):
    done, folder = sweep(tmp_path, *REGRESSION, "optim.lr=0.01,1e15")
    assert done.returncode == 1  # a sweep with a failed job
    table = pd.read_csv(folder / "summary.csv")
    assert list(table["status"]) == ["completed", "failed"] and "non-finite" in table["error"][1]
    code, alone = run_in_process(tmp_path / "alone", *REGRESSION, "optim.lr=0.01")
    assert_same_as_alone(last(folder / "0"), last(alone), 1e-5)  # its partner's NaN did not reach it


def interrupted_group_resumes_exactly(tmp_path, args):
    """SIGTERM a fused sweep of two jobs after a few steps, resume it, and compare each job's last
    checkpoint with the uninterrupted sweep's: bitwise (weights, loop, RNG, carried state)."""
    reference, ref_folder = sweep(tmp_path / "ref", *args)
    assert reference.returncode == 0, reference.stderr[-2000:]
    root = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "runner", "-m", "hydra/launcher=fused", *args,
                             f"output_root={root}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # until the group has taken a few steps
        rows = list(root.glob("multirun/*/1/metrics.jsonl"))
        if rows and rows[0].read_text().count('"train"') >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    (folder,) = (root / "multirun").iterdir()
    assert list(pd.read_csv(folder / "summary.csv")["status"]) == ["interrupted", "interrupted"]
    resumed = run_cli(f"resume={folder}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for job in ("0", "1"):
        ours, theirs = last(folder / job), last(ref_folder / job)
        assert ours["loop"] == theirs["loop"]
        for name in theirs["model"]:
            assert torch.equal(ours["model"][name], theirs["model"][name]), name
        assert torch.equal(ours["rng"]["torch"], theirs["rng"]["torch"])
        for key, value in theirs.get("family", {}).items():
            assert torch.equal(ours["family"][key], value) if torch.is_tensor(value) else ours["family"][key] == value


def test_sigterm_stops_a_fused_group_and_resume_continues_it_exactly(tmp_path):
    interrupted_group_resumes_exactly(tmp_path, [*REGRESSION, "trainer.max_epochs=12", "trainer.log_every_n_steps=1",
                                                 "trainer.deterministic=true", "trainer.seed=0,1"])


@pytest.mark.slow
def test_sigterm_during_a_fused_groups_test_evaluation_is_recorded_and_resume_evaluates_again(tmp_path):
    """Training done, job 0 tested, SIGTERM while job 1 is evaluated: job 1 is recorded as interrupted
    (not left 'running'), the sweep exits 143, and resume= evaluates it as the run alone does."""
    args = [*IWAE, "dataset.n_test=200", "loss.eval_k=1000", "trainer.seed=0,1"]  # ~5 s a job's evaluation
    proc = subprocess.Popen([sys.executable, "-m", "runner", "-m", "hydra/launcher=fused", *args,
                             f"output_root={tmp_path}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not any(tmp_path.glob("multirun/*/0/plots/samples.png")):
        time.sleep(0.05)  # job 0's test ends with its samples: job 1's evaluation begins (summaries come at the end)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    (folder,) = (tmp_path / "multirun").iterdir()
    table = pd.read_csv(folder / "summary.csv")
    assert list(table["status"]) == ["completed", "interrupted"]
    assert table["error"][1] == "interrupted by SIGTERM during the test evaluation"
    resumed = run_cli(f"resume={folder}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    code, alone = run_in_process(tmp_path / "alone", *args[:-1], "trainer.seed=1")
    assert code == 0
    ours, theirs = (json.loads((f / "summary.json").read_text())["metrics"] for f in (folder / "1", alone))
    assert ours["test/nll_k1000"] == pytest.approx(theirs["test/nll_k1000"], rel=1e-6)


@pytest.mark.slow
def test_sigterm_inside_an_epoch_of_a_fused_char_lstm_group_then_resume_is_exact(tmp_path):
    """The carried hidden state of each fused job survives a mid-epoch stop."""
    from runner.data.text import embedded_corpus

    corpus = tmp_path / "docs.txt"
    corpus.write_text(embedded_corpus()[:8_000], encoding="utf-8")
    interrupted_group_resumes_exactly(tmp_path, [
        "experiment=char_lstm", "device=cpu", "trainer.progress=none", "trainer.max_epochs=3", "trainer.batch_size=4",
        f"dataset.path={corpus}", "dataset.seq_len=20", "model.hidden_size=16", "model.embedding_dim=8",
        "model.sample_length=5", "model.impl=manual", "trainer.log_every_n_steps=1", "trainer.deterministic=true",
        "trainer.seed=0,1"])


@pytest.mark.slow  # the fused char-LSTM; the other families' fused tests stay
def test_fused_char_lstm_jobs_carry_their_own_state_and_equal_their_runs_alone(tmp_path):
    """Two char-LSTM jobs (the hand-written recurrence, batched over jobs by vmap) fused: each
    carries its own hidden state from chunk to chunk, across two epochs, and ends as the job run
    alone (bitwise on this CPU; 1e-6 allowed); nn.LSTM does not fuse and says why."""
    from runner.data.text import embedded_corpus
    from runner.families.charlm import fusion_blocker

    corpus = tmp_path / "docs.txt"
    corpus.write_text(embedded_corpus()[:4_000], encoding="utf-8")
    charlm = ["experiment=char_lstm", "device=cpu", "trainer.progress=none", "trainer.max_epochs=2",
              "trainer.batch_size=4", f"dataset.path={corpus}", "dataset.seq_len=20", "model.hidden_size=16",
              "model.embedding_dim=8", "model.sample_length=5", "model.impl=manual"]
    done, folder = sweep(tmp_path / "fused", *charlm, "trainer.seed=0,1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fused group of 2 jobs" in (folder / "0" / "run.log").read_text()
    code, alone = run_in_process(tmp_path / "alone", *charlm, "trainer.seed=1")
    assert code == 0
    fused, ref = last(folder / "1"), last(alone)
    assert fused["family"]["h"].shape == (2, 4, 16)  # the carried state: layers, streams, hidden
    for key in ("h", "c"):
        torch.testing.assert_close(fused["family"][key], ref["family"][key], rtol=1e-6, atol=1e-7)
    assert_same_as_alone(fused, ref, 1e-6)
    assert "impl=manual" in fusion_blocker({"impl": "torch"}, {})
    assert "dropout" in fusion_blocker({"impl": "manual", "dropout": 0.5}, {})


@pytest.mark.slow
def test_max_autotune_compiles_a_step_that_trains_like_the_eager_one_alone_and_fused(tmp_path, caplog):
    """trainer.compile_mode=max-autotune-no-cudagraphs (the matrix products generated too): the
    run takes the eager run's steps, and a fused group with it equals its jobs alone with it."""
    mode = ("trainer.compile=true", "trainer.compile_mode=max-autotune-no-cudagraphs")
    code, eager = run_in_process(tmp_path / "eager", *IWAE, "trainer.seed=1")
    assert code == 0
    with caplog.at_level(logging.INFO, logger="runner"):
        code, alone = run_in_process(tmp_path / "alone", *IWAE, *mode, "trainer.seed=1")
    assert code == 0
    assert "compiled as one function (mode max-autotune-no-cudagraphs)" in caplog.text
    assert relative_difference(last(alone)["model"], last(eager)["model"]) < 1e-5
    done, folder = sweep(tmp_path, *IWAE, *mode, "trainer.seed=0,1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert relative_difference(last(folder / "1")["model"], last(alone)["model"]) < 1e-5


@pytest.mark.slow
def test_a_compiled_optimizer_steps_like_the_eager_one_alone_and_fused(tmp_path):
    """trainer.compile_optimizer=true: the run alone takes the eager optimizer's steps (to float
    rounding), and a fused group, stepping its jobs' optimizers in one compiled call, equals its
    jobs run alone with the same setting."""
    compiled = [*IWAE, "loss=iwae", "trainer.compile_optimizer=true"]
    code, eager = run_in_process(tmp_path / "eager", *IWAE, "loss=iwae", "trainer.seed=1")
    assert code == 0
    code, alone = run_in_process(tmp_path / "alone", *compiled, "trainer.seed=1")
    assert code == 0
    assert_same_as_alone(last(alone), last(eager), 1e-5)
    done, folder = sweep(tmp_path, *compiled, "trainer.seed=0,1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fused group of 2 jobs" in (folder / "0" / "run.log").read_text()
    assert_same_as_alone(last(folder / "1"), last(alone), 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("preset", [
    [*IWAE, "loss=iwae"],
    ["experiment=char_lstm", "device=cpu", "trainer.progress=none", "trainer.max_epochs=1", "trainer.max_steps=20",
     "model.impl=manual", "model.sample_length=20"]], ids=["iwae", "char_lstm"])
def test_a_compiled_step_trains_like_the_eager_one_and_fuses_like_it(tmp_path, preset, caplog):
    """trainer.compile=true compiles a step-in-parts family's model and loss as one function (the
    recurrent state it carries included): the run takes the eager run's steps (to float rounding),
    and a compiled fused group equals its jobs run alone compiled."""
    code, eager = run_in_process(tmp_path / "eager", *preset, "trainer.seed=1")
    assert code == 0
    with caplog.at_level(logging.INFO, logger="runner"):
        code, alone = run_in_process(tmp_path / "alone", *preset, "trainer.compile=true", "trainer.seed=1")
    assert code == 0
    assert "the model and its loss compiled as one function" in caplog.text
    assert relative_difference(last(alone)["model"], last(eager)["model"]) < 1e-5
    done, folder = sweep(tmp_path, *preset, "trainer.compile=true", "trainer.seed=0,1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fused group of 2 jobs" in (folder / "0" / "run.log").read_text()
    assert relative_difference(last(folder / "1")["model"], last(alone)["model"]) < 1e-5


def test_trainer_compile_leaves_a_dreg_step_eager_and_says_so(tmp_path, caplog):
    """DReG's encoder gradient comes from a tensor hook, which does not survive torch.compile (the
    model compiled alone hands it no gradient; model and loss compiled as one failed on an H200):
    trainer.compile=true (iwae_paper's GPU default) warns and trains exactly as the eager run."""
    code, eager = run_in_process(tmp_path / "eager", *IWAE, "loss=dreg", "trainer.max_steps=4")
    assert code == 0
    with caplog.at_level(logging.INFO, logger="runner"):
        code, asked = run_in_process(tmp_path / "asked", *IWAE, "loss=dreg", "trainer.max_steps=4",
                                     "trainer.compile=true")
    assert code == 0
    assert "trainer.compile=true: loss=dreg's gradient hook does not survive torch.compile; the step runs " \
           "uncompiled" in caplog.text
    for name, weight in last(eager)["model"].items():
        assert torch.equal(last(asked)["model"][name], weight), name


def test_the_fused_benchmark_refuses_unknown_rows():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fused.py"), "--rows", "a,z"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --rows a,z: rows are letters among a,b,c,d,e,f"


def models_and_optimizers(optimizer_class, jobs=3, stacked=True, **kwargs):
    """``jobs`` small models (a layer with a 2-D weight and a bias, and a second layer) with one
    optimizer each; ``stacked``: their parameters stacked as a fused group stacks them."""
    from runner.engine.fused import StackedParameters

    models = []
    for seed in range(jobs):
        torch.manual_seed(seed)
        models.append(torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)))
    stacks = StackedParameters(models) if stacked else None
    return models, [optimizer_class(m.parameters(), **kwargs) for m in models], stacks


@pytest.mark.parametrize("optimizer_class, kwargs", [
    (torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True}),
    (torch.optim.NAdam, {"lr": 0.01})])
def test_one_optimizer_over_the_stack_steps_each_job_bitwise_as_its_own(optimizer_class, kwargs):
    """StackedOptimizer against each job's own optimizer: same gradients, an lr changed between
    steps, then a resumed group (the jobs' states loaded, stacked again): bitwise equal weights
    and state; each job's state dict holds its own slices."""
    from runner.engine.checkpoint import own_optimizer_storage
    from runner.engine.stacked_optimizer import StackedOptimizer

    models, optimizers, stacks = models_and_optimizers(optimizer_class, **kwargs)
    alone_models, alone_optimizers, _ = models_and_optimizers(optimizer_class, stacked=False, **kwargs)  # plain models
    generator = torch.Generator().manual_seed(0)

    def steps(group, optimizers, stacks, lrs):
        for lr in lrs:
            for grad in stacks.grads:
                grad.copy_(torch.randn(grad.shape, generator=generator))
            for j, (model, optimizer) in enumerate(zip(alone_models, alone_optimizers)):
                for name, p in model.named_parameters():
                    p.grad = stacks.grads[stacks.names.index(name)][j].clone()
                optimizer.param_groups[0]["lr"] = lr
                optimizer.step()
            for optimizer in optimizers:  # each job's schedule writes its own optimizer's lr
                optimizer.param_groups[0]["lr"] = lr
            group.step(optimizers[1])

    steps(StackedOptimizer(optimizers, models, stacks, compiled=False), optimizers, stacks, (0.01, 0.01, 0.003))
    # Resumed: each job's saved state loaded into fresh optimizers, stacked again.
    saved = [own_optimizer_storage(o.state_dict()) for o in optimizers]
    for row in (row for state in saved for row in state["state"].values()):
        assert all(v.untyped_storage().nbytes() == v.nbytes for v in row.values() if torch.is_tensor(v))
    resumed, resumed_optimizers, resumed_stacks = models_and_optimizers(optimizer_class, **kwargs)
    for model, old in zip(resumed, models):
        model.load_state_dict(old.state_dict())
    for optimizer, state in zip(resumed_optimizers, saved):
        optimizer.load_state_dict(state)
    steps(StackedOptimizer(resumed_optimizers, resumed, resumed_stacks, compiled=False), resumed_optimizers,
          resumed_stacks, (0.003, 0.001))
    for model, alone in zip(resumed, alone_models):
        for (name, p), q in zip(model.named_parameters(), alone.parameters()):
            assert torch.equal(p, q), name
    for optimizer, alone in zip(resumed_optimizers, alone_optimizers):
        for p, state in zip(optimizer.param_groups[0]["params"], alone.state.values()):
            assert state.keys() == optimizer.state[p].keys()
            for key, value in state.items():
                mine = optimizer.state[p][key]
                assert torch.equal(mine, value) if torch.is_tensor(value) else mine == value, key
