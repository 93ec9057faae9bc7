"""A sweep stops on the first Ctrl-C: the running job checkpoints and is marked interrupted, no
later job starts, summary.csv lists the jobs that ran, the sweep exits 130; resume=<sweep folder>
finishes it: the interrupted job continues, the missing one runs, the completed one is kept."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pandas as pd

from conftest import ROOT, run_cli

SWEEP = ["-m", "experiment=regression", "device=cpu", "trainer.progress=none", "trainer.max_epochs=40",
         "dataset.n_train=512", "trainer.log_every_n_steps=1", "trainer.seed=0,1,2"]


def test_ctrl_c_stops_the_sweep_and_resume_finishes_it(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "runner", *SWEEP, f"output_root={tmp_path}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # until the second job has logged a step
        rows = list(tmp_path.glob("multirun/*/1/metrics.jsonl"))
        if rows and '"train"' in rows[0].read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    (sweep,) = (tmp_path / "multirun").iterdir()
    table = pd.read_csv(sweep / "summary.csv")
    assert list(table["job"]) == [0, 1] and list(table["status"]) == ["completed", "interrupted"]
    assert not (sweep / "2").exists()  # no later job started
    first = (sweep / "0" / "summary.json").read_bytes()

    refused = run_cli(f"resume={sweep}", "optim.lr=0.5")  # another run, not a continuation: nothing starts
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: resume= cannot change optim.lr (that would be another run); a resumed run takes only: "
        "trainer.max_epochs, trainer.max_steps, trainer.log_every_n_steps, trainer.val_every_n_steps, "
        "trainer.ckpt_every_n_steps, trainer.ckpt_every_n_epochs, trainer.progress, trainer.num_workers, trainer.eval_batch_size, device, logger, callbacks"]
    stopped_at = json.loads((sweep / "1" / "summary.json").read_text())["steps"]
    saved = (sweep / "1" / ".hydra" / "config.yaml").read_bytes()
    resumed = run_cli(f"resume={sweep}", "trainer.log_every_n_steps=7")  # a setting that may change mid-run
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # The interrupted job continued the config it started with (the replayed sweep command did not
    # overwrite it); the job that had not run wrote its own.
    assert (sweep / "1" / ".hydra" / "config.yaml").read_bytes() == saved
    assert "log_every_n_steps: 7" in (sweep / "2" / ".hydra" / "config.yaml").read_text()
    for job, since in (("1", stopped_at), ("2", 0)):  # the jobs that ran in the resumed sweep log every 7 steps
        logged = [r["step"] for r in map(json.loads, (sweep / job / "metrics.jsonl").read_text().splitlines())
                  if r["split"] == "train" and r["step"] > since]
        assert logged and all(step % 7 == 0 or step == 40 * 32 for step in logged), logged
    table = pd.read_csv(sweep / "summary.csv")
    assert list(table["job"]) == [0, 1, 2] and (table["status"] == "completed").all()
    assert (sweep / "0" / "summary.json").read_bytes() == first  # the completed job was kept as it was
    resumed_job = json.loads((sweep / "1" / "summary.json").read_text())
    assert resumed_job["steps"] == 40 * 32
