"""A job warned of its time limit (SIGUSR2, SLURM's --signal / submitit's signal_delay_s) writes its
checkpoint, is requeued, and the requeued job continues its own folder with no user action, ending
with the uninterrupted run's final weights bit for bit (CPU, trainer.deterministic=true):

* through submitit's own machinery (hydra/launcher=submitit_local: submitit's local executor runs
  the job and restarts it when submitit's handler requeues it; slurm_gpu / slurm_node use the same
  launcher code on SLURM), and
* as a plain SLURM job (``srun python -m runner ...``): ``scontrol requeue`` (a stand-in that
  records its arguments), then the same command with SLURM_RESTART_COUNT=1.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, only_run_folder, run_cli
from runner.errors import EXIT_SIGUSR2

pytestmark = pytest.mark.slow  # each test starts 2-3 runs and waits for a signal mid-run: ~1-2 min here

COMMON = ["experiment=regression", "trainer.deterministic=true", "device=cpu", "trainer.progress=none",
          "trainer.max_epochs=4", "trainer.log_every_n_steps=1", "trainer.seed=3"]
SLOW = '''
import time
from runner.callbacks.base import Callback

class Slow(Callback):
    """Slows each step down so that a signal surely lands mid-run; changes nothing of what is learned."""
    def on_train_steps(self, trainer, steps, row):
        time.sleep(0.1)
'''


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """(extra arguments, environment) that add the Slow callback to a run."""
    folder = tmp_path_factory.mktemp("slowcb")
    (folder / "slowcb.py").write_text(textwrap.dedent(SLOW))
    (folder / "conf" / "callbacks").mkdir(parents=True)
    (folder / "conf" / "callbacks" / "slow.yaml").write_text("# @package callbacks.slow\n_target_: slowcb.Slow\n")
    # --config-dir first: argparse takes the overrides after it
    return ["--config-dir", str(folder / "conf"), "callbacks=[default,slow]"], {"PYTHONPATH": str(folder)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run never interrupted: its final checkpoint and its training rows' steps."""
    root = tmp_path_factory.mktemp("reference")
    result = run_cli(*COMMON, f"output_root={root}")
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = only_run_folder(root)
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True), train_steps(run_dir)


def train_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["split"] == "train"]


def wait_for_rows(pattern: str, root: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for rows in root.glob(pattern):
            if rows.read_text().count('"split": "train"') >= n:
                return rows.parent
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it was signalled: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError("no training rows in time")


def assert_same_training(run_dir: Path, reference) -> None:
    expected, steps = reference
    got = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    for part in ("model", "optimizer", "schedule", "loop", "rng"):
        assert_equal(got[part], expected[part], part)
    assert train_steps(run_dir) == steps  # each step logged once, none lost over the requeue


def assert_equal(a, b, where):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def processes(*parts: str) -> list[int]:
    """Pids whose command line holds every one of ``parts`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if all(p in command for p in parts):
                found.append(int(entry.name))
    return found


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_")) and k != "RANK"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the submitit task through /proc")
def test_submitit_requeues_a_job_warned_of_its_time_limit_and_it_ends_as_if_never_stopped(tmp_path, slow, reference):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    args, env = slow
    sweep = subprocess.Popen([sys.executable, "-m", "runner", "-m", *args, "hydra/launcher=submitit_local", *COMMON,
                              f"output_root={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=clean_env(**env))
    job_dir = wait_for_rows("multirun/*/0/metrics.jsonl", tmp_path, 10, sweep)
    (task,) = processes("submitit.core._submit", str(tmp_path))  # the job's own process, under submitit's controller
    os.kill(task, signal.SIGUSR2)  # what SLURM sends signal_delay_s before the time limit
    out, err = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, err[-3000:]
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    assert_same_training(job_dir, reference)
    log = (job_dir / "run.log").read_text()  # both starts of the job wrote to it
    assert "passing SIGUSR2 on to submitit's handler" in log and "Requeued job" in log  # submitit requeued it
    assert log.count(f"run folder {job_dir}") == 2  # and the local executor started it again, in the same folder
    assert sorted(p.name for p in job_dir.parent.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0"]


def test_a_plain_slurm_job_requeues_itself_and_continues_its_folder(tmp_path, slow, reference):
    args, env = slow
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    job = {"SLURM_JOB_ID": "918273", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env}
    command = [*args, *COMMON, f"output_root={tmp_path / 'out'}"]
    first = subprocess.Popen([sys.executable, "-m", "runner", *command], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=clean_env(**job))
    run_dir = wait_for_rows("out/runs/*/metrics.jsonl", tmp_path, 10, first)
    first.send_signal(signal.SIGUSR2)
    out, err = first.communicate(timeout=300)
    assert first.returncode == EXIT_SIGUSR2, err[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 918273\n"
    assert "requeued SLURM job 918273" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == "interrupted by SIGUSR2"
    # SLURM starts the same command again, with SLURM_RESTART_COUNT set
    again = run_cli(*command, env={**job, "SLURM_RESTART_COUNT": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert only_run_folder(tmp_path / "out") == run_dir  # the folder of its first start, no new one
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert_same_training(run_dir, reference)
