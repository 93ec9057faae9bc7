"""A run folder is written by one run, ever; checkpoints prove themselves; every exit leaves a
true summary (issue: never lose or fake a result). Each test fails on the code before it."""
from __future__ import annotations

import json
import re
import signal

import pytest
import torch

from conftest import run_in_process

FAST = ["experiment=regression", "trainer.progress=none", "device=cpu", "trainer.deterministic=true"]


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def train_rows(run_dir):
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["split"] == "train"]


def files_of(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def completed(tmp_path):
    code, run = run_in_process(tmp_path / "done", *FAST)
    assert code == 0
    return run


def test_a_new_run_refuses_a_folder_that_holds_another_runs_results(tmp_path, completed):
    from runner import run
    from runner.errors import UserError

    before = files_of(completed)
    with pytest.raises(UserError, match="holds another run's results"):
        run([*FAST, "optim.lr=0.01", f"hydra.run.dir={completed}"])
    assert files_of(completed) == before


def test_resume_writes_into_its_own_folder_and_never_retrains_a_completed_run(tmp_path, completed):
    from runner import run
    from runner.errors import UserError

    before = files_of(completed)
    with pytest.raises(UserError, match="continues in its own folder"):
        run([f"resume={completed}", f"hydra.run.dir={tmp_path / 'elsewhere'}"])
    code, kept = run_in_process(tmp_path / "kept", *FAST, "trainer.keep_last=false")
    assert code == 0 and not (kept / "checkpoints" / "last.pt").exists()
    kept_before = files_of(kept)
    with pytest.raises(UserError, match="cannot be extended"):
        run([f"resume={kept}", "trainer.max_epochs=3"])
    assert files_of(completed) == before and files_of(kept) == kept_before


def test_a_damaged_checkpoint_is_named_and_the_previous_one_offered(tmp_path):
    from runner import run

    code, part = run_in_process(tmp_path, *FAST)  # two epochs: last.pt at step 32, last.prev.pt at 16
    assert code == 0
    last = part / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=True)
    payload["rng"]["torch"][100] ^= 0xFF  # one byte of the saved RNG state, the file still a valid zip
    torch.save(payload, last)
    result = run([f"resume={part}", "trainer.max_epochs=3"])
    assert result["exit_code"] == 2, result
    assert re.search(r"last\.pt is damaged.*last\.prev\.pt \(step 16\), is intact", result["error"]), result["error"]
    assert summary(part)["status"] == "completed"  # nothing was touched


def test_a_torn_last_row_of_metrics_jsonl_is_dropped_and_the_run_goes_on(tmp_path):
    from runner import run

    code, part = run_in_process(tmp_path, *FAST, "trainer.max_epochs=1")
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "step": 16, "spl')  # what a crash mid-write leaves
    result = run([f"resume={part}", "trainer.max_epochs=2"])
    assert result["exit_code"] == 0 and result["steps"] == 32
    assert "line" in (part / "run.log").read_text() and "not a whole row" in (part / "run.log").read_text()


def test_a_resumed_run_logs_the_same_training_rows_as_the_uninterrupted_one(tmp_path):
    window = ["trainer.log_every_n_steps=8", "trainer.max_epochs=2"]
    code, whole = run_in_process(tmp_path / "whole", *FAST, *window)
    assert code == 0
    # SIGTERM after step 5: the checkpoint falls inside the log window of steps 1-8
    code, part = run_in_process(tmp_path / "part", *FAST, *window, "+callbacks.stop._target_=mishaps.SignalAt",
                                "+callbacks.stop.step=5")
    assert code == 143 and summary(part)["status"] == "interrupted"
    from runner import run

    assert run([f"resume={part}"])["exit_code"] == 0
    assert [(r["step"], r["loss"]) for r in train_rows(part)] == [(r["step"], r["loss"]) for r in train_rows(whole)]


def test_a_failing_disk_gives_one_line_and_a_summary_that_says_failed(tmp_path, capsys, monkeypatch):
    import runner.engine.results as results

    real = results.atomic_write_json

    def full_disk(path, obj):
        if obj.get("status") != "running":
            raise OSError(28, "No space left on device", str(path))
        real(path, obj)

    monkeypatch.setattr(results, "atomic_write_json", full_disk)
    code, run = run_in_process(tmp_path, *FAST, "+callbacks.disk._target_=mishaps.DiskFullAt", "+callbacks.disk.step=8")
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert code == 1 and summary(run)["status"] == "failed" and "No space left" in summary(run)["error"]
    assert len([line for line in out.splitlines() if line.startswith("failed:")]) == 1, out


def test_a_signal_during_start_up_is_recorded_as_an_interruption(tmp_path, capsys):
    code, run = run_in_process(tmp_path, *FAST, "dataset._target_=mishaps.signalled_while_building")
    s = summary(run)
    assert code == 128 + signal.SIGTERM and s["status"] == "interrupted" and "start-up" in s["error"]
    assert "during start-up" in capsys.readouterr().out
