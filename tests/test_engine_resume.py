"""Crash safety: SIGTERM writes a checkpoint and exits 143; a run killed with SIGKILL at random
steps and resumed each time ends bitwise-identical to a run never interrupted."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, only_run_folder, run_cli

LONG = ["experiment=regression", "device=cpu", "trainer.deterministic=true", "trainer.max_epochs=6",
        "trainer.batch_size=8", "trainer.ckpt_every_n_steps=1", "trainer.log_every_n_steps=1",
        "dataset.n_train=512", "model.hidden=64", "optim=adam"]


def start(output_root: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runner", *LONG, f"output_root={output_root}", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run_root: Path, step: int, timeout: float = 120) -> Path:
    """Wait until the run has logged optimizer step ``step``; returns its folder."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = list((run_root / "runs").glob("*")) if (run_root / "runs").exists() else []
        if runs and (runs[0] / "metrics.jsonl").exists():
            lines = (runs[0] / "metrics.jsonl").read_text().splitlines()
            if any((json.loads(l).get("step") or 0) >= step for l in lines if l.strip()):
                return runs[0]
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step}")


def final_state(run_dir: Path) -> tuple[dict, dict]:
    payload = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return payload["model"], json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow  # tests/test_resume_exact.py (SIGKILL, bitwise) and test_fused.py (SIGTERM of a group) cover it in the default run
def test_sigterm_checkpoints_and_resume_continues(tmp_path):
    proc = start(tmp_path)
    run_dir = wait_for_step(tmp_path, 5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert "Traceback" not in err
    resumed = run_cli(f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow  # tests/test_resume_exact.py makes the same check on three families in the default run
def test_sigkill_at_random_steps_then_resume_is_bitwise_identical(tmp_path):
    reference = run_cli(*LONG, f"output_root={tmp_path / 'ref'}")
    assert reference.returncode == 0, reference.stderr
    ref_model, ref_summary = final_state(only_run_folder(tmp_path / "ref"))

    rng = random.Random(0)
    root = tmp_path / "killed"
    proc = start(root)
    run_dir = wait_for_step(root, rng.randint(3, 60))
    proc.kill()
    proc.wait()
    for _ in range(2):  # resume, and kill the resumed run again at a later random point
        proc = subprocess.Popen([sys.executable, "-m", "runner", f"resume={run_dir}"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.5, 6.0))
        proc.kill()
        proc.wait()
    final = run_cli(f"resume={run_dir}")
    assert final.returncode == 0, final.stderr
    model, summary = final_state(run_dir)
    assert summary["status"] == "completed"
    for name, value in ref_model.items():
        assert torch.equal(model[name], value), name
    for key, value in ref_summary["metrics"].items():
        assert summary["metrics"][key] == value, key
    assert summary["steps"] == ref_summary["steps"]


def test_resuming_a_completed_run_leaves_it_untouched(tmp_path):
    done = run_cli("experiment=regression", "device=cpu", "trainer.max_epochs=1", f"output_root={tmp_path}")
    assert done.returncode == 0, done.stderr
    run_dir = only_run_folder(tmp_path)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    again = run_cli(f"resume={run_dir}")
    assert again.returncode == 0 and "has completed already" in again.stdout
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before
