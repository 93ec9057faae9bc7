"""What ran (runner/runs/identity.py): the git state of a checkout read back with git itself, the
parameter count against the model's own tensors, and a run's summary.json carrying both."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from torch import nn

from conftest import ROOT, run_in_process
from runner.runs.identity import checkout_state, parameter_counts, run_identity

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")


def git(folder, *args):
    return subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_a_checkout_gives_its_commit_and_whether_tracked_files_changed(tmp_path):
    repo = tmp_path / "project"
    (repo / "pkg").mkdir(parents=True)
    git(repo, "init", "-q")
    (repo / "pkg" / "mod.py").write_text("x = 1\n")
    git(repo, "add", ".")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "first")
    head = git(repo, "rev-parse", "HEAD")
    assert checkout_state(str(repo / "pkg")) == {"commit": head, "dirty": False, "root": str(repo.resolve())}
    (repo / "untracked.txt").write_text("")  # untracked files do not make the code dirty
    assert checkout_state(str(repo))["dirty"] is False
    (repo / "pkg" / "mod.py").write_text("x = 2\n")
    assert checkout_state(str(repo))["dirty"] is True
    # a folder git does not track there (runner installed into a venv inside a project) is not that code
    (repo / "venv" / "runner").mkdir(parents=True)
    (repo / "venv" / "runner" / "__init__.py").write_text("")
    assert checkout_state(str(repo / "venv" / "runner"), "__init__.py") is None
    outside = tmp_path / "plain"
    outside.mkdir()
    assert checkout_state(str(outside)) is None


def test_parameters_count_each_tensor_once():
    shared = nn.Linear(3, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2))  # tied: the first layer twice
    model[3].bias.requires_grad_(False)
    assert parameter_counts(model) == (3 * 4 + 4 + 4 * 2 + 2, 3 * 4 + 4 + 4 * 2)
    identity = run_identity(model, torch.device("cpu"))
    assert identity["gpu"] is None and identity["versions"]["torch"] == torch.__version__
    assert identity["versions"]["cuda"] == torch.version.cuda


def test_summary_json_says_what_ran(tmp_path):
    code, run_dir = run_in_process(tmp_path, "experiment=regression", "device=cpu", "trainer.max_epochs=1",
                                   "trainer.progress=none", "tags=[baseline,seed_sweep]", f"output_root={tmp_path}")
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    weights = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert summary["parameters"] == summary["trainable_parameters"] == sum(t.numel() for t in weights.values())
    assert summary["tags"] == ["baseline", "seed_sweep"]
    runner_code = summary["code"]["runner"]  # this checkout (the tests run from it)
    assert runner_code["commit"] == git(ROOT, "rev-parse", "HEAD")
    assert runner_code["dirty"] == bool(git(ROOT, "status", "--porcelain", "--untracked-files=no"))
    assert summary["versions"]["python"].count(".") == 2 and summary["gpu"] is None
