"""Fused sweeps on one GPU (issue: many small-model jobs as one batched run): IWAE k=50, batch 20,
one stochastic layer, MNIST, TF32, the captured step with 10 steps per launch. Aggregate
model-steps/s (jobs x each job's steps/s) of:

(a) the single path with torch.compile and torch's fused Adam, which is also the rate of the same
    jobs run one after another (start-up left out);
(b) the same without compile (the fused step is not compiled unless asked);
(c) 1, 2, 4, 8, 16 jobs fused by ``hydra/launcher=fused`` (different seeds);
(d) the fused jobs (each count of ``--jobs`` from 2 on) with ``trainer.compile=true``;
(e) 8 jobs in 8 processes at once through the joblib launcher (``hydra/launcher=parallel``);
(f) (a) and (d) with ``trainer.compile_optimizer=true`` (fused Adam's kernel keeps few SMs busy
    on this model: benchmarks/profile_fused.py); (f) single is ``experiment=iwae_paper``'s GPU default.
``--rows`` picks rows by letter (default: all).

``--family charlm``: the same table for the char-LSTM 2x128 (Tiny Shakespeare, batch 50, 50
characters, captured step): (a) one job on nn.LSTM (cuDNN), (b) one job on the hand-written
recurrence (``model.impl=manual``, the one that fuses), (c) fused jobs, (e) joblib on nn.LSTM;
no compile rows.

Each job's rate is the median of its logged training rates after the first window (warm-up,
capture). Usage: python benchmarks/fused.py [--family iwae|charlm] [--mnist DIR] [--text FILE]
[--steps N] [--jobs 1,2,4] [--rows a,c,d] [--smoke] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT


def job_rates(sweep_or_run: Path, per_step: int, unit: str = "samples") -> list[float]:
    """Steps/s of each job under a sweep folder (or of one run folder): its logged ``unit``/s
    over the units of one step."""
    folders = sorted(p for p in sweep_or_run.iterdir() if (p / "metrics.jsonl").is_file()) \
        if not (sweep_or_run / "metrics.jsonl").is_file() else [sweep_or_run]
    rates = []
    for folder in folders:
        rows = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
        train = [r[f"{unit}_per_s"] for r in rows if r["split"] == "train"][1:]
        rates.append(statistics.median(train) / per_step)
    return rates


def runner(args: list[str], multirun: bool) -> tuple[Path, float]:
    """``python -m runner`` in a subprocess; (its run or sweep folder, wall seconds)."""
    root = Path(tempfile.mkdtemp(prefix="bench-fused-"))
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "runner", *(["-m"] if multirun else []), *args,
                           f"output_root={root}"], cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - started
    if done.returncode != 0:
        raise RuntimeError(f"runner failed ({done.returncode}): {done.stderr[-3000:]}")
    (folder,) = (root / ("multirun" if multirun else "runs")).iterdir()
    return folder, wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", choices=("iwae", "charlm"), default="iwae")
    parser.add_argument("--mnist", default=str(ROOT / ".gpu_data" / "mnist"))
    parser.add_argument("--text", default=str(ROOT / ".gpu_data" / "tinyshakespeare" / "input.txt"))
    parser.add_argument("--steps", type=int, default=30000)
    parser.add_argument("--jobs", default="1,2,4,8,16")
    parser.add_argument("--rows", default="a,b,c,d,e,f", help="which rows, by letter")
    parser.add_argument("--smoke", action="store_true", help="a few steps on the CPU, to check the script")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = set(args.rows.split(","))
    if not rows <= set("abcdef"):
        print(f"error: --rows {args.rows}: rows are letters among a,b,c,d,e,f", file=sys.stderr)  # one line, exit 2
        sys.exit(2)
    charlm = args.family == "charlm"
    batch, unit = (50, "tokens") if charlm else (20, "samples")
    per_step = batch * (50 if charlm else 1)  # a char-LSTM step is batch x 50 characters
    if args.smoke:  # the smoke run's data end after 100 steps (5 epochs of 20): log inside them
        args.steps = min(args.steps, 100)
    log_every = max(1, min(1000, args.steps // 10))
    device = "device=cpu" if args.smoke else "device=gpu"
    if charlm:
        data = ["experiment=char_lstm"] if args.smoke else ["experiment=char_lstm_shakespeare", f"dataset.path={args.text}"]
        common = [*data, device, f"trainer.batch_size={batch}",
                  f"trainer.max_steps={args.steps}", "trainer.max_epochs=1000", f"trainer.log_every_n_steps={log_every}",
                  "trainer.progress=none", "trainer.val_every_n_steps=100000000"]
        fast = [] if args.smoke else ["trainer.cuda_graph=true"]
        single = [("(a) single nn.LSTM (cuDNN)", ["model.impl=torch"]), ("(b) single manual LSTM", ["model.impl=manual"])]
        fused_with, joblib_with = ["model.impl=manual"], ["model.impl=torch"]
    else:
        if args.smoke:
            common = ["experiment=iwae_silhouettes", device, "dataset.n_train=400", "dataset.n_val=0",
                      "dataset.n_test=20", f"trainer.batch_size={batch}", "loss.eval_k=1", f"trainer.max_steps={args.steps}",
                      f"trainer.log_every_n_steps={log_every}", "trainer.progress=none", "trainer.max_epochs=5"]
        else:
            common = ["experiment=iwae_mnist", f"dataset.root={args.mnist}", "dataset.n_val=0", device,
                      f"trainer.batch_size={batch}", "loss.k=50", "loss.eval_k=1", "trainer.precision=tf32",
                      f"trainer.max_steps={args.steps}", "trainer.max_epochs=1000",
                      f"trainer.log_every_n_steps={log_every}", "trainer.progress=none"]
        fast = [] if args.smoke else ["trainer.cuda_graph=true", "trainer.data_on_device=true",
                                      "trainer.steps_per_graph=10"]
        compiled = [] if args.smoke else ["trainer.compile=true"]
        single = [("(a) single, best path (+compile)", compiled), ("(b) single, no compile", [])]
        fused_with, joblib_with = [], []
    results: dict[str, dict] = {}

    def record(name: str, folder: Path, wall: float, jobs: int) -> None:
        rates = job_rates(folder, per_step, unit)
        results[name] = {"jobs": jobs, "per_job_steps_s": rates, "aggregate_steps_s": sum(rates), "wall_s": wall}
        print(f"{name}: {jobs} job(s), aggregate {sum(rates):,.0f} model-steps/s, wall {wall:.0f} s", flush=True)

    jobs = [int(j) for j in args.jobs.split(",")]
    eight = ",".join(str(s) for s in range(8))

    def fused(k: int, extra: list[str]) -> tuple[Path, float]:
        seeds = ",".join(str(s) for s in range(k))
        return runner(["hydra/launcher=fused", *common, *fast, *extra, f"trainer.seed={seeds}"], True)

    for (name, extra), letter in zip(single, "ab"):
        if letter in rows or letter == "a":  # (a) is what every row is compared with
            record(name, *runner([*common, *fast, *extra], False), 1)
    for k in jobs if "c" in rows else []:
        record(f"(c) fused x{k}", *fused(k, fused_with), k)
    if not args.smoke and not charlm:
        for k in [k for k in jobs if k > 1] if "d" in rows else []:
            record(f"(d) fused x{k} +compile", *fused(k, compiled), k)
    if not args.smoke and "e" in rows:
        record("(e) joblib x8 processes", *runner(["hydra/launcher=parallel", "hydra.launcher.n_jobs=8", *common,
                                                   *fast, *joblib_with, f"trainer.seed={eight}"], True), 8)
    if not args.smoke and not charlm and "f" in rows:
        both = [*compiled, "trainer.compile_optimizer=true"]
        record("(f) single +compiled optimizer", *runner([*common, *fast, *both], False), 1)
        for k in [k for k in jobs if k > 1]:
            record(f"(f) fused x{k} +compiled optimizer", *fused(k, both), k)
    best_single = results[single[0][0]]["aggregate_steps_s"]
    joblib = results.get("(e) joblib x8 processes", {}).get("aggregate_steps_s")
    print(f"\n{'variant':<34} {'jobs':>4} {'model-steps/s':>14} {'vs (a)':>7} {'vs (e)':>7}")
    for name, r in results.items():
        vs_joblib = f"{r['aggregate_steps_s'] / joblib:6.2f}x" if joblib else "     -"
        print(f"{name:<34} {r['jobs']:>4} {r['aggregate_steps_s']:>14,.0f} {r['aggregate_steps_s'] / best_single:6.2f}x "
              f"{vs_joblib}")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "env": os.environ.get("GPU_NAME")}, indent=1))


if __name__ == "__main__":
    main()
