"""The debug group: fdr, overfit, limit, profiler, anomaly (as lightning-hydra-template's)."""
from __future__ import annotations

import json
import textwrap

from conftest import only_run_folder, run_cli, run_in_process

FAST = ["experiment=regression", "trainer.progress=none", "device=cpu"]


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def train_losses(run_dir):
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if r["split"] == "train"]


def test_fdr_runs_one_batch_of_each_split_and_writes_no_checkpoints_or_loggers(tmp_path):
    code, run = run_in_process(tmp_path, *FAST, "debug=fdr", "trainer.max_epochs=5")
    s = summary(run)
    assert code == 0 and s["status"] == "completed" and s["debug"] == "fdr"
    assert s["steps"] == 1 and s["eval_samples"] == {"val": 16, "test": 16}  # one batch of 16 each
    assert not (run / "checkpoints").exists() and not (run / "metrics.csv").exists()


def test_fast_dev_run_alone_and_limits_as_fractions_or_counts(tmp_path):
    code, run = run_in_process(tmp_path / "fdr", *FAST, "trainer.fast_dev_run=true")
    assert code == 0 and summary(run)["steps"] == 1
    # 256 training samples in batches of 16: 16 batches; a fifth of them is 3, for 3 epochs.
    code, run = run_in_process(tmp_path / "limit", *FAST, "debug=limit")
    s = summary(run)
    assert code == 0 and s["steps"] == 9 and s["epochs"] == 3 and s["debug"] == "limit"
    assert s["eval_samples"] == {"val": 16, "test": 16}  # 0.2 of 4 batches: at least one
    code, run = run_in_process(tmp_path / "count", *FAST, "trainer.limit_train_batches=5",
                               "trainer.limit_val_batches=2", "trainer.limit_test_batches=1.0")
    s = summary(run)
    assert code == 0 and s["steps"] == 10 and s["eval_samples"] == {"val": 32, "test": 64}


def test_overfit_drives_the_training_loss_of_two_batches_towards_zero(tmp_path):
    code, run = run_in_process(tmp_path, *FAST, "debug=overfit", "trainer.overfit_batches=2", "optim=adam",
                               "optim.lr=0.01", "trainer.max_epochs=150", "trainer.log_every_n_steps=2")
    losses = train_losses(run)
    assert code == 0 and summary(run)["steps"] == 300
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


def test_profiler_writes_a_trace_and_prints_the_top_operators(tmp_path):
    result = run_cli(*FAST, "debug=profiler", f"output_root={tmp_path}")
    assert result.returncode == 0, result.stderr
    run = only_run_folder(tmp_path)
    trace = json.loads((run / "profiler" / "trace.json").read_text())
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
    top = (run / "profiler" / "top_ops.txt").read_text()
    assert "aten::" in top and "Self CPU" in top and top.splitlines()[1] in result.stdout


def test_anomaly_names_the_layer_that_makes_the_first_nan(tmp_path):
    (tmp_path / "nanets.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class Sqrt(nn.Module):
            def forward(self, x):
                return torch.sqrt(x)  # NaN for a negative input

        def model(dim: int):
            return nn.Sequential(nn.Linear(dim, 8), nn.Tanh(), Sqrt(), nn.Linear(8, 1))
    '''))
    result = run_cli(*FAST, "debug=anomaly", "model._target_=nanets.model", "~model.hidden", "~model.batchnorm",
                     f"output_root={tmp_path / 'out'}", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("failed:")]
    assert len(lines) == 1 and "module '2' (Sqrt)" in lines[0] and "its output" in lines[0], result.stdout
