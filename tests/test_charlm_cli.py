"""The char-LM presets through Hydra and the command line: composition, a tiny run, a bad path."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, compose, only_run_folder, run_cli
from runner.data.text import embedded_corpus


def wait_for_step(output_root: Path, step: int, timeout: float = 120) -> Path:
    """The run folder, once the run has logged optimizer step ``step``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for metrics in output_root.glob("runs/*/metrics.jsonl"):
            if any(json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines() if line.strip()):
                return metrics.parent
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {step}")


def _plain(*overrides: str) -> dict:
    return OmegaConf.to_container(compose(*overrides), resolve=True, enum_to_str=True)


def test_presets_compose_with_char_rnn_defaults():
    cfg = _plain("experiment=char_lstm")
    data, model, trainer = cfg["dataset"], cfg["model"], cfg["trainer"]
    assert data["_target_"] == "runner.data.text.build_text" and data["path"] is None
    assert data["batch_size"] == trainer["batch_size"] == 50 and data["seq_len"] == 50
    assert model["_target_"] == "runner.models.char_lstm.CharLSTM"
    assert (model["num_layers"], model["hidden_size"], model["dropout"], model["impl"]) == (2, 128, 0.0, "torch")
    assert cfg["loss"]["_target_"] == "runner.losses.charlm.TokenCrossEntropy"
    assert cfg["optim"]["_target_"] == "torch.optim.Adam" and cfg["optim"]["lr"] == 2e-3
    assert (trainer["gradient_clip_val"], trainer["monitor"], trainer["monitor_mode"]) == (5, "val/bpc", "min")
    shakespeare = _plain("experiment=char_lstm_shakespeare", "trainer.batch_size=32")
    # under paths.data_dir: data/ in the launch folder unless RUNNER_DATA_DIR says otherwise
    data_dir = os.path.join(os.getcwd(), os.path.expanduser(os.environ.get("RUNNER_DATA_DIR", "data")))
    assert shakespeare["dataset"]["path"] == os.path.normpath(os.path.join(data_dir, "tinyshakespeare", "input.txt"))
    assert shakespeare["dataset"]["batch_size"] == 32  # interpolated from the trainer
    assert _plain("experiment=char_lstm", "dataset=text", "dataset.path=/x.txt")["dataset"]["path"] == "/x.txt"


def test_tiny_run_writes_bpc_and_samples(tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text(embedded_corpus()[:12_000], encoding="utf-8")
    result = run_cli(
        "experiment=char_lstm", "device=cpu", "trainer.max_epochs=2", "trainer.batch_size=4",
        f"dataset.path={corpus}", "dataset.seq_len=25", "model.impl=manual", "model.hidden_size=16",
        "model.num_layers=1", "model.embedding_dim=8", "model.sample_length=30", f"output_root={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_folder(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["unit"] == "tokens"
    metrics = summary["metrics"]
    for split in ("val", "test"):
        assert math.isclose(metrics[f"{split}/bpc"], metrics[f"{split}/loss"] / math.log(2), rel_tol=1e-12)
        assert summary["eval_samples"][split] == 600 - 1  # every character after the split's first
    # Train: 4 streams of (10_800 - 1) // 4 // 25 * 25 = 2675 characters, 107 chunks an epoch.
    assert summary["steps"] == 2 * 107 and summary["samples_seen"] == 2 * 107 * 4 * 25
    samples = (run_dir / "samples.txt").read_text(encoding="utf-8")
    headers = [line for line in samples.splitlines() if line.startswith("=== ")]
    assert [h.split(" | ")[:2] for h in headers] == [
        ["=== val", "epoch 0"], ["=== val", "epoch 1"], ["=== test", "epoch 1"]]
    payload = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert "lstm.weight_hh_l0" in payload["model"]  # nn.LSTM's names: checkpoints move between impls


def test_missing_text_file_is_a_user_error(tmp_path):
    result = run_cli("experiment=char_lstm", "device=cpu", f"dataset.path={tmp_path / 'absent.txt'}",
                     f"output_root={tmp_path}")
    assert result.returncode == 2
    assert "dataset.path" in result.stderr + result.stdout and "Traceback" not in result.stderr


@pytest.mark.slow
def test_sigterm_inside_an_epoch_then_resume_is_bitwise_identical(tmp_path):
    """The carried LSTM state goes into the checkpoint, so the resumed streams continue exactly."""
    corpus = tmp_path / "docs.txt"
    corpus.write_text(embedded_corpus()[:12_000], encoding="utf-8")
    args = ["experiment=char_lstm", "device=cpu", "trainer.deterministic=true", "trainer.max_epochs=2",
            "trainer.batch_size=4", "trainer.log_every_n_steps=1", f"dataset.path={corpus}", "dataset.seq_len=25",
            "model.hidden_size=32", "model.num_layers=1", "model.embedding_dim=8", "model.sample_length=10"]
    assert run_cli(*args, f"output_root={tmp_path / 'ref'}").returncode == 0
    reference = only_run_folder(tmp_path / "ref")

    proc = subprocess.Popen([sys.executable, "-m", "runner", *args, f"output_root={tmp_path / 'cut'}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = wait_for_step(tmp_path / "cut", 40)  # inside epoch 0 (107 chunks an epoch)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, proc.stderr.read()[-2000:]
    interrupted_at = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < interrupted_at["loop"]["batch_in_epoch"] < 107 and interrupted_at["family"]["h"].shape == (1, 4, 32)
    resumed = run_cli(f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)["model"]
    got = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    ref_metrics = json.loads((reference / "summary.json").read_text())["metrics"]
    assert json.loads((run_dir / "summary.json").read_text())["metrics"] == ref_metrics
