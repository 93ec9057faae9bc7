"""What resume= takes and refuses, one process per run folder, a failed resume touches nothing,
fine-tuning from a checkpoint, and result files readable by the group."""
from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from runner import run
from conftest import ROOT, only_run_folder, run_cli

FAST = ["experiment=regression", "device=cpu", "trainer.progress=none"]


def folder_bytes(run_dir):
    """Every result file's bytes (run.log, which records each attempt, and the lock left out)."""
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name not in ("run.log", ".lock")}


def test_resume_takes_changeable_overrides_and_refuses_the_rest(tmp_path):
    assert run_cli(*FAST, "trainer.max_epochs=1", f"output_root={tmp_path}").returncode == 0
    run_dir = only_run_folder(tmp_path)
    before = folder_bytes(run_dir)
    refused = run_cli(f"resume={run_dir}", "optim.lr=0.5", "trainer.max_epochs=3")
    assert refused.returncode == 2
    assert "resume= cannot change optim.lr" in refused.stderr and "trainer.max_epochs" in refused.stderr
    assert folder_bytes(run_dir) == before  # nothing touched
    longer = run_cli(f"resume={run_dir}", "trainer.max_epochs=3")  # a completed run, extended
    assert longer.returncode == 0, longer.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 3 and summary["steps"] == 3 * 16
    assert "val/loss" in summary["metrics"] and summary["eval_samples"]["val"] == 64


@pytest.mark.slow  # a long run held while a second process tries it (~35 s); tests/test_run_folder_lock.py checks the lock
def test_one_process_per_run_folder_and_a_failed_resume_touches_nothing(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "runner", *FAST, "trainer.max_epochs=400", "dataset.n_train=512",
                             "trainer.log_every_n_steps=1", f"output_root={tmp_path}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob("runs/*/checkpoints/last.pt")) and time.time() < deadline:
        time.sleep(0.05)
    run_dir = only_run_folder(tmp_path)
    second = run_cli(f"resume={run_dir}")
    assert second.returncode == 2 and "is in use by another runner process" in second.stderr
    proc.send_signal(signal.SIGKILL)  # the lock dies with its holder
    proc.wait()
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"torn")  # a resume that fails to start...
    before = folder_bytes(run_dir)
    failed = run_cli(f"resume={run_dir}")
    assert failed.returncode == 2 and "cannot be read" in failed.stdout + failed.stderr
    assert folder_bytes(run_dir) == before  # ...leaves summary.json and metrics.jsonl as they were
    missing = run_cli(f"resume={tmp_path / 'nowhere'}")
    assert missing.returncode == 2 and not (tmp_path / "nowhere").exists()


def test_fine_tuning_starts_from_a_checkpoints_weights(tmp_path):
    assert run_cli(*FAST, f"output_root={tmp_path / 'a'}").returncode == 0
    ckpt = only_run_folder(tmp_path / "a") / "checkpoints" / "last.pt"
    trained = torch.load(ckpt, weights_only=True)["model"]
    # max_steps=1 with lr=0: the weights after one step are the ones loaded
    tuned = run([*FAST, "mode=train", f"ckpt_path={ckpt}", "optim.lr=1e-12", "trainer.max_steps=1",
                 f"output_root={tmp_path / 'b'}"])
    assert tuned["exit_code"] == 0, tuned["error"]
    run_dir = only_run_folder(tmp_path / "b")
    start = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert start["loop"]["step"] == 1
    for name, value in trained.items():
        torch.testing.assert_close(start["model"][name], value, rtol=0, atol=1e-9)
    assert f"initialised the weights from {ckpt}" in (run_dir / "run.log").read_text()
    other = run([*FAST, f"ckpt_path={ckpt}", "model.hidden=32", f"output_root={tmp_path / 'c'}"])
    assert other["exit_code"] == 2 and "ckpt_strict=false" in other["error"]
    loose = run([*FAST, f"ckpt_path={ckpt}", "model.hidden=32", "ckpt_strict=false", "trainer.max_steps=1",
                 f"output_root={tmp_path / 'd'}"])
    assert loose["exit_code"] == 0, loose["error"]
    absent = run([*FAST, f"ckpt_path={tmp_path / 'absent.pt'}", f"output_root={tmp_path / 'e'}"])
    assert absent["exit_code"] == 2 and "absent.pt: no such file" in absent["error"]


def test_result_files_are_readable_by_the_group(tmp_path):
    assert run_cli(*FAST, "trainer.max_epochs=1", f"output_root={tmp_path}").returncode == 0
    run_dir = only_run_folder(tmp_path)
    for name in ("summary.json", "checkpoints/last.pt", "checkpoints/best.pt", "metrics.jsonl"):
        mode = stat.S_IMODE((run_dir / name).stat().st_mode)
        assert mode & stat.S_IRGRP and mode & stat.S_IROTH, (name, oct(mode))
