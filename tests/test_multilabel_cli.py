"""End to end through the CLI: the multi-label presets run, write per_class.csv and their
metrics, and bad settings exit with code 2 naming the key."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from test_multilabel_data import jpeg_and_png_folder

PRESETS = ["focal_densenet", "bce_densenet", "pos_weight_densenet", "asl_densenet"]
TINY = ["dataset.n_train=96", "dataset.n_val=48", "dataset.n_test=40", "trainer.max_epochs=1",
        "trainer.batch_size=32", "device=cpu", "trainer.progress=none"]
# One intra-op thread: the tests share 2 cores with other processes (see test_multilabel_model.py).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "runner", *args, f"output_root={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=ENV)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_compose(preset):
    done = subprocess.run([sys.executable, "-m", "runner", f"experiment={preset}", "--cfg", "job"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = yaml.safe_load(done.stdout)
    assert cfg["dataset"]["_target_"] == "runner.data.shapes.build"
    assert cfg["model"]["_target_"] == "runner.models.torchvision_models.build" and cfg["model"]["name"] == "densenet121"
    assert cfg["trainer"]["monitor"] == "val/mAP" and cfg["trainer"]["monitor_mode"] == "max"


def test_focal_densenet_end_to_end(tmp_path):
    done = run(["experiment=focal_densenet", *TINY], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["eval_samples"] == {"val": 48, "test": 40}
    metrics = summary["metrics"]
    for key in ("val/loss", "val/mAP", "val/macro_f1", "test/loss", "test/mAP", "test/micro_f1",
                "test/macro_f1_tuned", "test/recall/red_square", "test/precision/yellow_cross",
                "test/f1/green_disc", "test/ap/blue_triangle", "test/f1_tuned/red_square"):
        assert key in metrics, key
    assert not any(isinstance(v, dict) for v in metrics.values())
    with open(run_dir / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["red_square", "green_disc", "blue_triangle", "yellow_cross"]
    assert all(r["threshold_source"] == "val" for r in rows)
    assert (run_dir / "per_class_val.csv").is_file()


def test_balanced_sampler_and_interval_term_run(tmp_path):
    done = run(["experiment=asl_densenet", "dataset.sampler=balanced", "loss.interval={low:-6,high:6,weight:0.01}",
                *TINY], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow  # JPEG decoding with workers; tests/test_multilabel_data.py checks the decoded images
def test_jpeg_files_decoded_on_the_device_with_workers(tmp_path):
    """dataset=multilabel_csv with decode=device: two workers read the files, batches of JPEG
    bytes (and already decoded PNGs) are decoded where the run is — here the CPU."""
    folder, csv = jpeg_and_png_folder(tmp_path, 24)
    split = ["train"] * 16 + ["val"] * 4 + ["test"] * 4
    lines = (tmp_path / "train.csv").read_text().splitlines()
    (tmp_path / "all.csv").write_text("\n".join([lines[0] + ",split"] + [f"{l},{s}" for l, s in zip(lines[1:], split)]))
    done = run(["experiment=focal_densenet", "dataset=multilabel_csv", f"dataset.csv={tmp_path / 'all.csv'}",
                f"dataset.image_dir={folder}", "dataset.split_column=split", "dataset.image_size=32",
                "dataset.decode=device", "trainer.num_workers=2", "trainer.batch_size=8", "trainer.max_epochs=1",
                "device=cpu", "trainer.progress=none"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["samples_seen"] == 16
    assert summary["eval_samples"] == {"val": 4, "test": 4}
    assert 0 <= summary["metrics"]["test/mAP"] <= 1


@pytest.mark.parametrize("override,named", [
    ("dataset.sampler=oversample", "dataset.sampler"),
    ("loss.gama=1", "loss.gama"),
    ("loss.interval={low:1,high:0}", "loss.interval"),
])
def test_bad_settings_exit_2_naming_the_key(tmp_path, override, named):
    from conftest import rejected

    code, error = rejected(tmp_path, "experiment=focal_densenet", override, *TINY)
    assert code == 2 and named in error, error


@pytest.mark.slow
def test_default_run_learns(tmp_path):
    """`python -m runner` as shipped: 2 epochs on shapes, far above the prevalence baseline (mean
    prevalence ~0.25 is the mAP of a constant score). Its wall time is reported in README.md, not
    asserted here."""
    done = subprocess.run([sys.executable, "-m", "runner", "trainer.progress=none", f"output_root={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["test/mAP"] > 0.8
