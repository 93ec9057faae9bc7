"""The command line as a user meets it: run folder contents, summary.json, exit codes and
messages for bad configs, sweeps, evaluation-only runs, run-folder uniqueness."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import ROOT, only_run_folder, run_cli, run_in_process

FAST = ["experiment=regression", "device=cpu", "trainer.max_epochs=1"]
SUMMARY_FIELDS = {"status", "metrics", "eval_samples", "steps", "samples_seen", "wall_time_s", "throughput",
                  "device", "error"}


def test_end_to_end_run_folder(tmp_path):
    result = run_cli(*FAST, f"output_root={tmp_path}", "trainer.val_every_n_steps=8")
    assert result.returncode == 0, result.stderr
    run_dir = only_run_folder(tmp_path)
    assert run_dir.name.endswith("_regression-max_epochs1")  # the preset plus what the overrides change
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "metrics.jsonl",
                 "summary.json", "checkpoints/last.pt", "checkpoints/best.pt", "run.log"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_FIELDS <= summary.keys()
    assert summary["status"] == "completed" and summary["error"] is None
    assert summary["eval_samples"] == {"val": 64, "test": 64}
    assert summary["steps"] == 16 and summary["samples_seen"] == 256
    assert summary["throughput"] > 0 and summary["wall_time_s"] > 0 and summary["device"] == "cpu"
    assert {"val/loss", "test/loss"} <= summary["metrics"].keys()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all({"epoch", "step", "split"} <= row.keys() for row in rows)
    val_steps = [r["step"] for r in rows if r["split"] == "val"]
    assert val_steps == [8, 16]
    assert [r["split"] for r in rows].count("test") == 1
    for name in ("last", "best"):
        payload = torch.load(run_dir / "checkpoints" / f"{name}.pt", weights_only=True)
        assert {"model", "optimizer", "schedule", "loop", "rng"} <= payload.keys()
    assert "final metrics" in result.stdout and "test/loss" in result.stdout  # the closing table


def test_eval_only_from_checkpoint(tmp_path):
    code, trained = run_in_process(tmp_path / "train", *FAST)  # the training run in this process: faster
    assert code == 0
    result = run_cli(*FAST, "mode=eval", f"ckpt_path={trained / 'checkpoints/best.pt'}",
                     f"output_root={tmp_path / 'eval'}")
    assert result.returncode == 0, result.stderr
    evaluated = only_run_folder(tmp_path / "eval")
    assert evaluated != trained
    summary = json.loads((evaluated / "summary.json").read_text())
    original = json.loads((trained / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 0
    assert summary["metrics"]["test/loss"] == pytest.approx(original["metrics"]["test/loss"], rel=1e-6)


@pytest.mark.parametrize("override, needle, code", [
    ("trainer.foo=1", "allowed keys of trainer: accumulate_grad_batches", 2),
    ("trainer.batch_size=abc", "trainer.batch_size", 2),
    ("loss=nope", "available options in 'loss'", 2),
    ("optim=rmsprop", "available options in 'optim'", 2),
    ("optim._target_=torch.optim.Nope", "cannot be imported", 2),
    ("optim.momentum=-5", "Invalid momentum value", 2),
    ("trainer.batch_size=0", "trainer.batch_size=0 must be > 0", 2),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 must be > 0", 2),
    ("model.foo=3", "allowed keys of model: batchnorm, hidden", 2),
    ("model.hidden=wide", "model.hidden='wide' has the wrong type: expected int", 2),
    ("trainer.precision=8", "allowed: 32, tf32, bf16, 16", 2),
    ("mode=eval", "mode=eval needs ckpt_path", 2),
])
def test_bad_config_exit_code_and_message(tmp_path, override, needle, code):
    # In process (runner.run: the command line's composition and checks); the command line's own
    # one-line form is the next test's.
    from conftest import rejected

    got, error = rejected(tmp_path, *FAST, override)
    assert got == code and needle in error and "\n" not in error and "Traceback" not in error, error


@pytest.mark.parametrize("override, needle", [
    ("loss=nope", "available options in 'loss'"),  # found by Hydra while composing
    ("optim.momentum=-5", "Invalid momentum value"),  # found by torch's SGD as the run builds it
])
def test_bad_config_on_the_command_line_is_one_line_and_exit_2(tmp_path, override, needle):
    result = run_cli(*FAST, f"output_root={tmp_path}", override)
    assert result.returncode == 2 and result.stdout == ""
    assert needle in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr


def test_a_compiled_optimizer_with_fp16_loss_scaling_is_refused(tmp_path):
    from conftest import rejected

    code, error = rejected(tmp_path, *FAST, "trainer.compile_optimizer=true", "trainer.precision=16")
    assert code == 2 and "trainer.compile_optimizer=true does not combine with trainer.precision=16" in error
    assert "\n" not in error


def test_checkpoint_of_another_model_is_refused(tmp_path):
    code, trained = run_in_process(tmp_path / "a", *FAST)
    assert code == 0
    ckpt = trained / "checkpoints" / "last.pt"
    from conftest import rejected

    code, error = rejected(tmp_path / "b", *FAST, "model.hidden=32", "mode=eval", f"ckpt_path={ckpt}")
    assert code == 2 and "belongs to another model or config" in error
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:1000])
    code, error = rejected(tmp_path / "c", *FAST, "mode=eval", f"ckpt_path={truncated}")
    assert code == 2 and "cannot be read" in error and "\n" not in error


def test_sweep_of_two_jobs_gives_summary_csv(tmp_path):
    result = run_cli("-m", *FAST, "trainer.seed=0,1", f"output_root={tmp_path}")
    assert result.returncode == 0, result.stderr
    (sweep,) = (tmp_path / "multirun").iterdir()
    table = pd.read_csv(sweep / "summary.csv")
    assert len(table) == 2
    assert sorted(table["trainer.seed"]) == [0, 1]
    assert (table["status"] == "completed").all()
    assert table["test/loss"].notna().all() and table["test/loss"].nunique() == 2
    for job in ("0", "1"):
        assert (sweep / job / "summary.json").is_file()


@pytest.mark.slow  # three runs at once (~30 s)
def test_runs_started_in_the_same_second_get_distinct_folders(tmp_path):
    args = [sys.executable, "-m", "runner", *FAST, f"output_root={tmp_path}", "hydra.run.dir=${run_folder:null,"
            f"{tmp_path}/runs/same}}"]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(3)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert names == ["same", "same_1", "same_2"]
    for name in names:
        assert json.loads((tmp_path / "runs" / name / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("every, epochs", [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5])])
def test_last_checkpoint_every_n_epochs_and_always_at_the_end(tmp_path, monkeypatch, every, epochs):
    from runner.engine.loop import Trainer

    written, save = [], Trainer.save_checkpoint
    monkeypatch.setattr(Trainer, "save_checkpoint",
                        lambda self, name: (written.append((name, self.state.epoch)), save(self, name))[1])
    code, run_dir = run_in_process(tmp_path, *FAST, "trainer.max_epochs=5", f"trainer.ckpt_every_n_epochs={every}",
                                   "trainer.save_top_k=0")
    assert code == 0
    assert [epoch for name, epoch in written if name == "last"] == epochs
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["loop"]["epoch"] == 5
