"""End to end through the CLI: the density presets run, write their metrics, and fail cleanly."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, rejected, run_in_process

TINY = ["dataset.n_train=200", "dataset.n_val=50", "dataset.n_test=40", "loss.eval_k=20",
        "trainer.max_epochs=1", "trainer.batch_size=50", "device=cpu", "trainer.progress=none"]


def run(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "runner", *args, f"output_root={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_iwae_silhouettes_preset_end_to_end(tmp_path):
    done = run(["experiment=iwae_silhouettes", "model=vae2", "loss=dreg", *TINY], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    metrics = summary["metrics"]
    for key in ("val/loss", "val/bound", "test/loss", "test/nll_k20", "test/active_units", "val/active_units",
                "test/active_units_1", "test/active_units_2"):
        assert key in metrics, key
    assert "val/nll_k20" not in metrics  # val stays cheap: only the bound (loss.val_eval_k=0)
    assert metrics["test/active_units"] == metrics["test/active_units_1"] + metrics["test/active_units_2"]
    assert not [key for key in metrics if "/" not in key]  # every metric names its split
    assert metrics["test/nll_k20"] < metrics["test/loss"] + 5  # k=20 estimate at least about as tight as k=5
    assert summary["eval_samples"] == {"val": 50, "test": 40}
    assert (run_dir / "plots" / "samples.png").is_file()


def test_bad_density_settings_exit_2_naming_the_key(tmp_path):
    # In process (the command line's exit-2 path is tests/test_bad_inputs.py's): the job's code and
    # the one-line error runner.run returns.
    code, error = rejected(tmp_path / "k", "experiment=iwae_silhouettes", "loss.k=0", *TINY)
    assert code == 2 and "loss.k" in error
    code, error = rejected(tmp_path / "root", "experiment=vae_mnist", f"dataset.root={tmp_path / 'no_mnist_here'}",
                           *TINY[4:])
    assert code == 2 and "dataset.root" in error


def test_iwae_paper_preset_composes_the_papers_settings():
    done = subprocess.run([sys.executable, "-m", "runner", "experiment=iwae_paper", "device=cpu", "--cfg", "job",
                           "--resolve"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    import yaml

    cfg = yaml.safe_load(done.stdout)
    assert cfg["schedule"]["_target_"] == "runner.schedule.IWAEPaperLR" and cfg["trainer"]["max_epochs"] is None
    assert cfg["trainer"]["batch_size"] == 20 and cfg["optim"]["eps"] == 1e-4
    assert cfg["dataset"]["n_val"] == 0 and cfg["loss"]["k"] == 50 and cfg["loss"]["eval_k"] == 5000
    # The captured-step path is the default only where it can run: one GPU (tests/test_gpu.py).
    assert not any(cfg["trainer"][key] for key in ("cuda_graph", "data_on_device", "compile"))
