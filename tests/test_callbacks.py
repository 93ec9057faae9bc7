"""Callbacks: a user's own from --config-dir (a metric of its own in metrics.jsonl and the loggers,
state that resume= restores, a stop on its own condition, alone and under 2 gloo processes), and
each built-in behaviour switched off."""
from __future__ import annotations

import csv
import json
import textwrap

import pytest
import torch

from conftest import only_run_folder, run_cli

FAST = ["experiment=regression", "trainer.progress=none", "device=cpu", "trainer.deterministic=true"]

CALLBACK = '''
from runner.callbacks.base import Callback


class Counter(Callback):
    """Counts validations (state resume= must restore), logs the count as a metric, and stops the
    run after ``stop_after`` validations."""

    def __init__(self, stop_after: int = 0):
        self.stop_after, self.validations = stop_after, 0

    def on_validation_end(self, trainer, metrics):
        self.validations += 1
        metrics["val/validations"] = float(self.validations)
        if self.stop_after and self.validations >= self.stop_after:
            trainer.request_stop(f"counted {self.validations} validations")

    def state_dict(self):
        return {"validations": self.validations}

    def load_state_dict(self, state):
        self.validations = state["validations"]
'''


@pytest.fixture
def user_callback(tmp_path):
    (tmp_path / "mycallbacks.py").write_text(textwrap.dedent(CALLBACK))
    (tmp_path / "conf" / "callbacks").mkdir(parents=True)
    (tmp_path / "conf" / "callbacks" / "counter.yaml").write_text(
        "# @package callbacks.counter\n_target_: mycallbacks.Counter\nstop_after: 0\n")
    return ("--config-dir", str(tmp_path / "conf"), "callbacks=[default,counter]"), {"PYTHONPATH": str(tmp_path)}


def rows(run_dir, split="val"):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_a_user_callback_logs_its_metric_keeps_its_state_over_resume_and_stops(tmp_path, user_callback):
    args, env = user_callback
    every = ["trainer.val_every_n_steps=4", "trainer.max_epochs=3"]  # 16 steps an epoch: 4 validations each
    whole = run_cli(*args, *FAST, *every, f"output_root={tmp_path / 'whole'}", env=env)
    assert whole.returncode == 0, whole.stderr
    run = only_run_folder(tmp_path / "whole")
    assert [r["val/validations"] for r in rows(run)] == [float(i) for i in range(1, 13)]
    with open(run / "metrics.csv") as f:  # the csv logger got it too
        assert [float(r["val/validations"]) for r in csv.DictReader(f) if r.get("val/validations")][-1] == 12.0
    # Two epochs, then resumed to three: the count goes on from the checkpoint's state.
    first = run_cli(*args, *FAST, "trainer.val_every_n_steps=4", "trainer.max_epochs=2",
                    f"output_root={tmp_path / 'parts'}", env=env)
    assert first.returncode == 0, first.stderr
    part = only_run_folder(tmp_path / "parts")
    state = torch.load(part / "checkpoints" / "last.pt", weights_only=True)["callbacks"]
    assert state["counter"] == {"validations": 8}
    resumed = run_cli(f"resume={part}", "trainer.max_epochs=3", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["val/validations"] for r in rows(part)] == [r["val/validations"] for r in rows(run)]
    a = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed bitwise
    # Its own stop: after the 3rd validation, at step 12.
    stopped = run_cli(*args, *FAST, *every, "callbacks.counter.stop_after=3", f"output_root={tmp_path / 'stop'}",
                      env=env)
    assert stopped.returncode == 0, stopped.stderr
    summary = json.loads((only_run_folder(tmp_path / "stop") / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["stop_reason"] == "counted 3 validations"


def test_a_callback_stop_is_the_same_step_under_two_processes(tmp_path, user_callback):
    args, env = user_callback
    common = [*args, "experiment=regression", "trainer.progress=none", "dataset.n_train=250",
              "trainer.val_every_n_steps=3", "trainer.max_epochs=4", "callbacks.counter.stop_after=5"]
    one = run_cli(*common, "device=cpu", "trainer.batch_size=16", f"output_root={tmp_path / 'one'}", env=env)
    two = run_cli(*common, "device=ddp", "device.devices=2", "device.backend=gloo", "trainer.batch_size=8",
                  f"output_root={tmp_path / 'two'}", env=env)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    s1, s2 = (json.loads((only_run_folder(tmp_path / n) / "summary.json").read_text()) for n in ("one", "two"))
    assert s1["steps"] == s2["steps"] == 15 and s1["stop_reason"] == s2["stop_reason"]


@pytest.mark.parametrize("off, gone", [
    ("~callbacks.checkpoints", "checkpoints"),
    pytest.param("~callbacks.plots", "plots/curves.png", marks=pytest.mark.slow),  # tests/test_readme.py runs it too
])
def test_a_built_in_callback_switched_off_leaves_its_files_out(tmp_path, off, gone):
    result = run_cli(*FAST, off, f"output_root={tmp_path}")
    assert result.returncode == 0, result.stderr
    run = only_run_folder(tmp_path)
    assert not (run / gone).exists() and (run / "summary.json").is_file()


def test_early_stopping_and_the_display_switched_off(tmp_path):
    stopping = ["trainer.early_stopping.patience=1", "trainer.val_every_n_steps=1",
                "trainer.progress=plain"]
    on = run_cli(*FAST, *stopping, f"output_root={tmp_path / 'on'}")
    off = run_cli(*FAST, *stopping, "~callbacks.early_stopping", "~callbacks.progress", f"output_root={tmp_path / 'off'}")
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    s_on, s_off = (json.loads((only_run_folder(tmp_path / n) / "summary.json").read_text()) for n in ("on", "off"))
    assert s_on["stop_reason"] == "early_stopping" and s_on["steps"] < 32
    assert s_off["stop_reason"] == "max_epochs" and s_off["steps"] == 32
    assert "step 1/" in on.stdout and "val @ step" in on.stdout
    assert "step 1/" not in off.stdout and "val @ step" not in off.stdout
