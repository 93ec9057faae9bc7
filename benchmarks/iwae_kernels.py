"""Issue 28 item 1, on one GPU in one process: ``model.fused_output`` (runner/models/vae_kernels.py:
the decoder's output layer and the Bernoulli log-likelihood as one Triton op that never writes
the logits) against the eager layers, IWAE k=50, batch 20, one stochastic layer, MNIST.

(i)   the op alone, forward and backward (a training step's share of it), eager (F.linear, softplus,
      autograd) against fused, at N = 6 x 50 x 20 rows (six jobs under vmap, as a fused group runs
      it) and N = 50 x 20 (one job): captured in a CUDA graph as the engine's step is, µs per call,
      the median of timed windows after warm-up; the kernels per call and their time from the
      profiler (uncaptured calls);
(ii)  the engine's single IWAE path with ``experiment=iwae_paper``'s GPU settings (captured,
      compiled, TF32, 10 steps per launch, compiled optimizer), flag off against on: steps/s;
(iii) six jobs fused (``hydra/launcher=fused``, seeds 0-5, k=50, the same settings), flag off
      against on: model-steps/s.
In (ii) and (iii) a rate is the median of the run's logged training rates after the first window
(warm-up, capture, compilation); the runs go in this process, one after the other.

--smoke: tiny versions on the CPU (the op under Triton's interpreter), to check the script end to
end. --tune: (i) again for other tile choices. --resources: no run; the kernels compiled for
sm_90 (no GPU needed) with their registers, spills and shared memory per tile choice.
Usage: python benchmarks/iwae_kernels.py [--mnist DIR] [--steps N] [--parts op,single,fused]
       [--tune] [--resources] [--smoke] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "--smoke" in sys.argv:  # Triton picks interpreted or compiled kernels as they are defined
    os.environ["TRITON_INTERPRET"] = "1"

import torch

from common import ROOT, captured, run_runner, steady_rate, sync
from fused import job_rates

BATCH, K, JOBS, PIXELS, HIDDEN = 20, 50, 6, 784, 200
TARGETS = {"single": 10_000, "fused": 40_000}  # steps/s, model-steps/s (issue 28)


def op_problem(jobs: int | None, k: int, batch: int, hidden: int, device: torch.device):
    """Inputs of the op as the model gives them: h [(J,) k, B, H], W, b, x (0/1)."""
    g = torch.Generator().manual_seed(0)
    lead = () if jobs is None else (jobs,)
    h = torch.tanh(torch.randn(*lead, k, batch, hidden, generator=g))
    weight = torch.randn(*lead, PIXELS, hidden, generator=g) / hidden ** 0.5
    bias = torch.randn(*lead, PIXELS, generator=g)
    x = torch.bernoulli(torch.full((*lead, batch, PIXELS), 0.3), generator=g)
    return [t.to(device).requires_grad_(i < 3) for i, t in enumerate((h, weight, bias, x))]


def forward_backward(fn, args):
    """One call as a training step makes it: the log-likelihoods and their gradients."""
    out = fn(*args)
    return torch.autograd.grad(out, args[:3], torch.ones_like(out))


def time_call(call, device: torch.device, windows: int, per_window: int) -> float:
    """µs per call: captured in a CUDA graph and replayed (on a GPU), the median of ``windows``
    timed windows of ``per_window`` calls after warm-up."""
    replay = captured(call) if device.type == "cuda" else call
    for _ in range(3):
        replay()
    times = []
    for _ in range(windows):
        sync(device)
        start = time.perf_counter()
        for _ in range(per_window):
            replay()
        sync(device)
        times.append((time.perf_counter() - start) / per_window * 1e6)
    return statistics.median(times)


def op_rows(device: torch.device, smoke: bool, tune: bool) -> list[dict]:
    from torch.func import vmap

    import runner.models.vae_kernels as vk

    k, batch, hidden = (3, 4, 32) if smoke else (K, BATCH, HIDDEN)
    windows, per_window = (2, 1) if smoke else (10, 200)
    results = []
    for jobs in (JOBS, None):
        args = op_problem(jobs, k, batch, hidden, device)
        n = (jobs or 1) * k * batch
        eager, fused = vk.output_loglik_reference, vk.output_loglik
        if jobs is not None:
            eager, fused = vmap(eager), vmap(fused)
        # The engine compiles its step (trainer.compile): Inductor's kernels for the eager layers'
        # elementwise work are the baseline that counts; the fused op is opaque to it.
        variants = [("eager + torch.compile", torch.compile(eager), None), ("eager", eager, None),
                    ("fused", fused, None)]
        if tune:
            variants += [(f"fused {t}", fused, t) for t in tile_choices()]
        for name, fn, tiles in variants:
            vk.TILES = tiles
            try:
                us = time_call(lambda: forward_backward(fn, args), device, windows, per_window)
            except Exception as e:  # a tile choice the GPU cannot run (resources): said, not fatal
                print(f"(i) N={n} {name}: failed: {str(e)[:200]}", flush=True)
                continue
            finally:
                vk.TILES = None
            row = {"part": "op", "rows": n, "variant": name, "us_per_call": us}
            if device.type == "cuda" and tiles is None:
                from profile_steps import kernels_of

                row["kernels"], row["kernel_us"], _ = kernels_of(lambda: forward_backward(fn, args))
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def tile_choices():
    """Tile choices for --tune: those that compiled for sm_90 without spilling (--resources)."""
    from runner.models.vae_kernels import Tiles

    for rows in (16, 32, 64):
        for dw_pixels in (16, 32):
            for warps in (4, 8):
                yield Tiles(rows=rows, dh_pixels=32 if rows == 16 else 16, dw_pixels=dw_pixels, num_warps=warps)


def engine_overrides(mnist: str, steps: int, smoke: bool) -> list[str]:
    if smoke:  # a narrow model: the interpreter computes every tile in Python
        return ["experiment=iwae_silhouettes", "device=cpu", "dataset.n_train=100", "dataset.n_val=0",
                "dataset.n_test=10", "trainer.batch_size=10", "loss.k=3", "loss.eval_k=3", "model.latent_dims=[8]",
                "model.hidden_dims=[[32,32]]", "trainer.max_epochs=10", "trainer.max_steps=6",
                "trainer.log_every_n_steps=2", "trainer.progress=none"]
    return ["experiment=iwae_paper", f"dataset.root={mnist}", "device=gpu", f"trainer.batch_size={BATCH}",
            f"loss.k={K}", "loss.eval_k=1", f"trainer.max_steps={steps}", f"trainer.log_every_n_steps={steps // 10}",
            "trainer.progress=none", "trainer.save_top_k=0"]


def single_rate(overrides: list[str], batch: int) -> float:
    _, rows = run_runner(*overrides)
    return steady_rate(rows, "samples") / batch


def fused_rate(overrides: list[str], batch: int, jobs: int) -> float:
    """A fused sweep run in this process as ``python -m runner -m`` runs it; the jobs' summed rates."""
    root = Path(tempfile.mkdtemp(prefix="bench-kernels-"))
    seeds = ",".join(str(s) for s in range(jobs))
    sys.argv = ["runner", "-m", "hydra/launcher=fused", *overrides, f"trainer.seed={seeds}", f"output_root={root}"]
    try:
        runpy.run_module("runner", run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"the fused sweep exited with {e.code} (logs under {root})") from None
    (sweep,) = (root / "multirun").iterdir()
    statuses = [json.loads((sweep / str(j) / "summary.json").read_text())["status"] for j in range(jobs)]
    if statuses != ["completed"] * jobs:
        raise RuntimeError(f"fused sweep jobs ended {statuses} (under {sweep})")
    return sum(job_rates(sweep, batch))


def engine_rows(parts: set[str], mnist: str, steps: int, smoke: bool) -> list[dict]:
    common = engine_overrides(mnist, steps, smoke)
    batch = 10 if smoke else BATCH
    results = []
    for flag in ("false", "true"):
        overrides = [*common, f"model.fused_output={flag}"]
        if "single" in parts:
            results.append({"part": "single", "fused_output": flag, "steps_per_s": single_rate(overrides, batch)})
            print(json.dumps(results[-1]), flush=True)
        if "fused" in parts:
            results.append({"part": "fused", "fused_output": flag, "jobs": JOBS,
                            "model_steps_per_s": fused_rate(overrides, batch, JOBS)})
            print(json.dumps(results[-1]), flush=True)
    return results


def print_table(results: list[dict]) -> None:
    """One row per variant; the last column: this row's speed over the first row's of its part."""
    print(f"\n{'part':<24} {'variant':<34} {'rate':>16} {'kernels':>8} {'kernel µs':>9} {'vs first':>9}")
    first: dict = {}
    order = {"op": 0, "single": 1, "fused": 2}
    for r in sorted(results, key=lambda r: (order[r["part"]], -r.get("rows", 0))):
        if r["part"] == "op":
            key, value = ("op", r["rows"]), r["us_per_call"]
            speed = first.setdefault(key, value) / value  # time of the first row over this one's
            kernels = f"{r['kernels']:>8} {r['kernel_us']:>9.1f}" if "kernels" in r else f"{'-':>8} {'-':>9}"
            print(f"{'(i) op, N=' + str(r['rows']):<24} {r['variant']:<34} {value:>9.1f} µs/call {kernels} {speed:>8.2f}x")
            continue
        rate = r.get("steps_per_s") or r["model_steps_per_s"]
        speed = rate / first.setdefault(r["part"], rate)
        name = "(ii) single iwae_paper" if r["part"] == "single" else f"(iii) fused x{r['jobs']}"
        variant = f"model.fused_output={r['fused_output']}"
        print(f"{name:<24} {variant:<34} {rate:>9,.0f} /s      {'':>8} {'':>9} {speed:>8.2f}x"
              f"  (target {TARGETS[r['part']]:,}/s)")


def resources() -> None:
    """Each kernel compiled for sm_90 (H100) offline at the tiles ``tiles_for`` picks for the
    benchmark's sizes on 132 SMs, in TF32 and full precision: registers a thread, bytes spilled
    (stack), shared memory. Needs no GPU; cuobjdump ships with Triton."""
    import re
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import runner.models.vae_kernels as vk

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    pointers = {"h_ptr", "w_ptr", "b_ptr", "x_ptr", "out_ptr", "g_ptr", "dh_ptr", "dw_ptr", "db_ptr"}
    for rows in (JOBS * K * BATCH, K * BATCH):
        for precision in ("tf32", "ieee"):
            t = vk.tiles_for(rows // (K * BATCH), K * BATCH, PIXELS, precision, sms=132)
            for kernel, blocks in ((vk._forward_kernel, {"BLOCK_N": t.rows, "BLOCK_P": t.pixels}),
                                   (vk._dh_kernel, {"BLOCK_N": t.rows, "BLOCK_P": t.dh_pixels}),
                                   (vk._dw_kernel, {"BLOCK_P": t.dw_pixels, "BLOCK_N": t.dw_rows})):
                constants = {**blocks, "BLOCK_H": vk._block_h(HIDDEN), "PRECISION": precision}
                signature = {a: "*fp32" if a in pointers else "constexpr" if a in constants else "i32"
                             for a in kernel.arg_names}
                compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                          target=GPUTarget("cuda", 90, 32),
                                          options={"num_warps": t.num_warps, "num_stages": t.num_stages})
                with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                    cubin.write(compiled.asm["cubin"])
                    cubin.flush()
                    usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", cubin.name],
                                           capture_output=True, text=True).stdout
                found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
                registers, spilled = found.groups() if found else ("?", "?")
                print(f"N={rows:<5} {precision:<4} {kernel.__name__:<16} {blocks} warps={t.num_warps}: "
                      f"{registers} registers, {spilled} bytes spilled, {compiled.metadata.shared} bytes shared")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mnist", default=str(ROOT / ".gpu_data" / "mnist"))
    parser.add_argument("--steps", type=int, default=10000, help="steps of each engine run")
    parser.add_argument("--parts", default="op,single,fused")
    parser.add_argument("--tune", action="store_true", help="(i) for other tile choices too")
    parser.add_argument("--resources", action="store_true", help="compile for sm_90 and print resources; no run")
    parser.add_argument("--smoke", action="store_true", help="tiny versions on the CPU, to check the script")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.resources:
        return resources()
    parts = set(args.parts.split(","))
    if not parts <= {"op", "single", "fused"}:
        print(f"error: --parts {args.parts}: parts are op, single, fused", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    results = op_rows(device, args.smoke, args.tune) if "op" in parts else []
    results += engine_rows(parts, args.mnist, args.steps, args.smoke)
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "gpu": device.type == "cuda" and
                                              torch.cuda.get_device_name(device)}, indent=1))


if __name__ == "__main__":
    main()
