"""Where a fused group's step time goes on the GPU (issue: fused sweeps; 8 IWAE jobs fused reach
2.1x the best single job, the target is 4x). For IWAE k=50, batch 20, TF32, captured, 10 steps per
launch, J jobs fused (J=1 is a group of one), it runs the real ``hydra/launcher=fused`` sweep
in a child process with the engine's ``take_steps`` wrapped (a group of one runs alone), and reports per group step:

* wall time in steady state (launches 100-300) and the host time inside ``take_steps`` (the
  input copies and the graph replay launch) against outside it (each job's bookkeeping in
  loop.py: counting, schedules, logging checks, fetching the next window's batches);
* from the profiler over 20 launches: the kernels and their summed time, so that
  ``1 - kernel time / wall`` is the GPU's idle share, and the kernels that cost most.

If the GPU is mostly busy, the batched kernels are the cost; if it idles, the host is.
Usage: python benchmarks/profile_fused.py [--jobs 1,8] [--mnist DIR] [--out FILE] [--compile-optimizer] [--trace DIR] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMED = (100, 300)  # launches timed without the profiler
PROFILED = (300, 320)  # launches under the profiler


def child(jobs: int, compiled: bool, mnist: str, out: str, smoke: bool, optimizer_compiled: bool,
          trace: str | None = None) -> None:
    """One sweep, in this process, with ``fit``'s step function wrapped."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import runner.engine.run as run
    from profile_steps import kernel_table

    real_fit, found = run.fit, {}
    sync = (lambda: None) if smoke else torch.cuda.synchronize
    # Launches timed and profiled (a smoke run on the CPU has a few steps and no kernels).
    (t0, t1), (p0, p1) = ((2, 6), (6, 8)) if smoke else (TIMED, PROFILED)

    def fit(trainers, take_steps, stop):
        calls, inside, marks = [0], [0.0], {}
        prof = profile(activities=[ProfilerActivity.CPU if smoke else ProfilerActivity.CUDA])

        def timed(windows, step):
            n = calls[0]
            calls[0] += 1
            if n in (t0, t1, p1):
                sync()
                marks[n] = time.perf_counter()
            if n == p0:
                prof.start()
            started = time.perf_counter()
            result = take_steps(windows, step)
            if t0 <= n < t1:
                inside[0] += time.perf_counter() - started
            if n == p1:
                prof.stop()
            return result

        real_fit(trainers, timed, stop)
        group_steps, wall = 10 * (t1 - t0), marks[t1] - marks[t0]
        count, kernel_us, ranked = kernel_table(prof, 10 * (p1 - p0))
        found.update(jobs=jobs, compiled=compiled, optimizer_compiled=optimizer_compiled,
                     wall_us_per_group_step=1e6 * wall / group_steps,
                     host_in_take_steps_us=1e6 * inside[0] / group_steps, model_steps_per_s=jobs * group_steps / wall,
                     kernels_per_group_step=count, kernel_us_per_group_step=kernel_us,
                     top=[(name[:120], round(t, 1)) for name, t in ranked[:60]])
        if trace:  # every kernel in launch order, to tell which op each one belongs to
            prof.export_chrome_trace(str(Path(trace) / f"trace_jobs{jobs}.json.gz"))  # gzip: six jobs' is tens of MB

    run.fit = fit  # the loop every group runs (a group of one too): runner/engine/run.py's train
    root = tempfile.mkdtemp(prefix="profile-fused-")
    seeds = ",".join(str(s) for s in range(jobs))
    data = ["experiment=iwae_silhouettes", "dataset.n_train=400", "dataset.n_test=20", "device=cpu",
            "trainer.max_steps=10"] if smoke else \
        ["experiment=iwae_mnist", f"dataset.root={mnist}", "device=gpu", "trainer.precision=tf32",
         "trainer.max_steps=3500", "trainer.cuda_graph=true", "trainer.data_on_device=true",
         "trainer.steps_per_graph=10", f"trainer.compile={str(compiled).lower()}"]
    sys.argv = ["runner", "-m", "hydra/launcher=fused", *data, "dataset.n_val=0", "trainer.batch_size=20", "loss.k=50",
                "loss.eval_k=1", "trainer.max_epochs=1000", "trainer.log_every_n_steps=1000", "trainer.progress=none",
                f"trainer.seed={seeds}", f"output_root={root}", f"trainer.compile_optimizer={str(optimizer_compiled).lower()}"]
    try:
        runpy.run_module("runner", run_name="__main__")
    except SystemExit:
        pass
    Path(out).write_text(json.dumps(found))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", default="1,8")
    parser.add_argument("--mnist", default=str(ROOT / ".gpu_data" / "mnist"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="a few steps on the CPU, to check the script")
    parser.add_argument("--compile-optimizer", action="store_true", help="with trainer.compile_optimizer=true")
    parser.add_argument("--trace", default=None, help="a folder for the profiler's chrome traces")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        jobs, compiled, out = args.child
        return child(int(jobs), compiled == "1", args.mnist, out, args.smoke, args.compile_optimizer, args.trace)
    results = []
    for jobs in (int(j) for j in args.jobs.split(",")):
        for compiled in (True, False) if jobs > 1 and not args.compile_optimizer else (True,):
            out = tempfile.mktemp(suffix=".json")
            subprocess.run([sys.executable, __file__, "--mnist", args.mnist, *(["--smoke"] if args.smoke else []),
                            *(["--compile-optimizer"] if args.compile_optimizer else []),
                            *(["--trace", args.trace] if args.trace else []), "--child", str(jobs),
                            "1" if compiled else "0", out], cwd=ROOT, check=True)
            r = json.loads(Path(out).read_text())
            results.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{'jobs':>4} {'compile':>7} {'model-steps/s':>13} {'wall µs':>8} {'host in step µs':>15} "
          f"{'kernels':>8} {'kernel µs':>9} {'GPU idle':>8}")
    for r in results:
        idle = 1 - r["kernel_us_per_group_step"] / r["wall_us_per_group_step"]
        print(f"{r['jobs']:>4} {str(r['compiled']):>7} {r['model_steps_per_s']:>13,.0f} {r['wall_us_per_group_step']:>8.0f} "
              f"{r['host_in_take_steps_us']:>15.0f} {r['kernels_per_group_step']:>8.0f} "
              f"{r['kernel_us_per_group_step']:>9.0f} {idle:>7.0%}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
