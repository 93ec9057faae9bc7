"""GPU-only checks (skipped on machines without CUDA; run on the lent GPU machine):
the whole step captured in a CUDA graph computes the same training as the eager loop."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_in_process

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")["model"]


def test_cuda_graph_step_equals_eager_step(tmp_path):
    # 250 samples at batch 16: 15 captured steps and an odd last batch run eagerly, each epoch.
    common = ("experiment=regression", "device=gpu", "trainer.progress=none", "optim=adam", "optim.lr=0.01",
              "dataset.n_train=250", "trainer.max_epochs=3", "trainer.gradient_clip_val=1.0")
    code, eager = run_in_process(tmp_path / "eager", *common)
    assert code == 0
    code, graph = run_in_process(tmp_path / "graph", *common, "trainer.cuda_graph=true", "trainer.data_on_device=true")
    assert code == 0
    a, b = weights(eager), weights(graph)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    s = json.loads((graph / "summary.json").read_text())
    assert s["steps"] == 3 * 16 and s["samples_seen"] == 750


def test_cuda_graph_iwae_trains(tmp_path):
    code, run_dir = run_in_process(tmp_path, "experiment=iwae_silhouettes", "device=gpu", "trainer.progress=none",
                                   "trainer.batch_size=20", "loss.k=50", "trainer.max_epochs=2", "loss.eval_k=100",
                                   "trainer.cuda_graph=true", "trainer.data_on_device=true")
    assert code == 0
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if r["split"] == "train"]
    assert train[-1] < train[0] and all(map(lambda v: v == v, train))


def test_bf16_channels_last_densenet(tmp_path):
    code, run_dir = run_in_process(tmp_path, "experiment=focal_densenet", "device=gpu", "trainer.progress=none",
                                   "trainer.precision=bf16", "trainer.channels_last=true", "trainer.max_epochs=1")
    assert code == 0
    assert json.loads((run_dir / "summary.json").read_text())["metrics"]["test/mAP"] > 0.3


def test_cuda_graph_char_lstm_carries_state_like_eager(tmp_path):
    common = ("experiment=char_lstm", "device=gpu", "trainer.progress=none", "trainer.max_epochs=1",
              "trainer.max_steps=40", "trainer.log_every_n_steps=10", "model.sample_length=20")
    code, eager = run_in_process(tmp_path / "eager", *common)
    assert code == 0
    code, graph = run_in_process(tmp_path / "graph", *common, "trainer.cuda_graph=true")
    assert code == 0
    a, b = weights(eager), weights(graph)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4)
