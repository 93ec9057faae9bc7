"""Early stopping (also under DDP), why a run ended, checkpoint retention, and a progress
display that moves with every step."""
from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, only_run_folder, run_cli, run_in_process

FAST = ("experiment=regression", "trainer.progress=none", "device=cpu")
# lr 0.5 with momentum diverges: val/loss gets worse at every validation after the first.
DIVERGING = ("optim.lr=0.5", "trainer.val_every_n_steps=4", "trainer.max_epochs=50")


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def val_steps(run_dir):
    return [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(l)["split"] == "val"]


def test_early_stopping_and_why_the_run_ended(tmp_path):
    code, run_dir = run_in_process(tmp_path / "es", *FAST, *DIVERGING, "trainer.early_stopping.patience=2")
    assert code == 0
    s = summary(run_dir)
    # best at the first validation (step 4), then two without improvement: stop at step 12
    assert s["stop_reason"] == "early_stopping" and s["steps"] == 12 and val_steps(run_dir) == [4, 8, 12]
    assert s["test_weights"] == "best"
    code, run_dir = run_in_process(tmp_path / "steps", *FAST, "trainer.max_steps=5")
    assert code == 0 and summary(run_dir)["stop_reason"] == "max_steps"
    code, run_dir = run_in_process(tmp_path / "epochs", *FAST, "trainer.max_epochs=1")
    assert code == 0 and summary(run_dir)["stop_reason"] == "max_epochs"
    code, run_dir = run_in_process(tmp_path / "delta", *FAST, "trainer.max_epochs=6", "trainer.early_stopping.patience=1",
                                   "trainer.early_stopping.min_delta=1e9")
    assert code == 0 and summary(run_dir)["steps"] == 2 * 16  # no improvement is big enough after the first


@pytest.mark.slow  # tests/test_callbacks.py checks a stop at the same step under two processes
def test_early_stopping_under_ddp_stops_every_rank_at_the_same_step(tmp_path):
    common = (*FAST, *DIVERGING, "trainer.early_stopping.patience=2", "optim.momentum=0.0", "dataset.n_train=250")
    one = run_cli(*common, "trainer.batch_size=16", f"output_root={tmp_path / 'one'}")
    two = run_cli(*common, "device=ddp", "device.devices=2", "device.backend=gloo", "trainer.batch_size=8",
                  f"output_root={tmp_path / 'two'}")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = only_run_folder(tmp_path / "one"), only_run_folder(tmp_path / "two")
    assert summary(b)["stop_reason"] == "early_stopping" and summary(a)["steps"] == summary(b)["steps"]
    assert val_steps(a) == val_steps(b)


def test_checkpoint_retention(tmp_path):
    code, run_dir = run_in_process(tmp_path / "top3", *FAST, "optim.lr=0.02", "trainer.val_every_n_steps=4",
                                   "trainer.max_epochs=2", "trainer.save_top_k=3")
    assert code == 0
    vals = {json.loads(l)["step"]: json.loads(l)["val/loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(l)["split"] == "val"}
    best3 = sorted(vals, key=lambda step: (vals[step], step))[:3]
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.glob("best_step*.pt")) == sorted(f"best_step{s}.pt" for s in best3)
    assert (folder / "best.pt").stat().st_ino == (folder / f"best_step{best3[0]}.pt").stat().st_ino
    assert torch.load(folder / "best.pt", weights_only=True)["loop"]["step"] == best3[0]
    code, run_dir = run_in_process(tmp_path / "none", *FAST, "trainer.save_top_k=0", "trainer.keep_last=false")
    assert code == 0 and not list((run_dir / "checkpoints").glob("*.pt"))
    assert summary(run_dir)["test_weights"] == "last"


@pytest.mark.slow  # DenseNet121 steps on a pty (~75 s); tests/test_progress.py checks the bar on a pty
def test_the_bar_moves_before_the_first_log_point(tmp_path):
    """On a terminal (a pty), the bar counts steps before the loss is first read."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "runner", "trainer.progress=rich", "device=cpu",
                             "dataset.n_train=320", "dataset.n_val=32", "dataset.n_test=32", "trainer.batch_size=32",
                             "trainer.max_epochs=1", "trainer.log_every_n_steps=1000", f"output_root={tmp_path}"],
                            cwd=ROOT, stdin=terminal, stdout=terminal, stderr=terminal, env={**os.environ, "COLUMNS": "160"})
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=300)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert proc.returncode == 0, screen[-2000:]
    assert screen.index("run folder:") < screen.index("device:") < screen.index("10/10")
    moving = re.findall(r"\b([1-9])/10\b[^\n\r]*loss —", screen)  # counted, loss not yet read
    assert len(set(moving)) >= 3, screen[-3000:]
