"""The first practitioner's question on the CPU: one fixed test split evaluated by 1 process and by
2 gloo processes — the same accuracy? every sample once? faster?

One network (experiment=classify's small CNN) is trained once through runner on Fashion-MNIST
(``--train-batches`` batches of 64; ``--mnist DIR`` for MNIST), then its 10,000 test images are
evaluated, alternating the variants for ``--rounds`` rounds so that machine noise hits all:

  (a) the question's loop: 1 process, a DataLoader, ``outputs = net(images)``, ``torch.max``,
      ``.item()`` per batch (in this process, torch's threads = the cores);
  (1) ``python -m runner mode=eval``, 1 process, as many intra-op threads as cores;
  (2) the same with ``device=ddp device.devices=2 device.backend=gloo``, 1 thread per process;
  (3) as (2) with torch's default threads (the cores) in each process: 2 x cores threads.

Reported: test accuracy and eval_samples from each run's summary.json, the evaluation alone
(``runner.engine.evaluate.evaluate`` on the test split, timed barrier to barrier in processes that
have loaded everything; median of the rounds) and the whole command's wall time (start-up,
reading the IDX files, loading the checkpoint, evaluating, writing the run folder). ``--smoke``:
the embedded patterns set (1,001 test images), 5 training batches, one round: to see it work.
Usage: python benchmarks/classification_eval_cpu.py [--fashion DIR | --mnist DIR] [--rounds 3] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from common import ROOT, run_runner

BATCH = 500  # experiment=classify's eval_batch_size
CORES = os.cpu_count() or 1
DDP2 = ["device=ddp", "device.devices=2", "device.backend=gloo"]
HAND = "(a) hand loop, 1 process, DataLoader, .item()"
VARIANTS = {  # name: (device overrides, intra-op threads per process)
    f"(1) runner, 1 process x {CORES} threads": (["device=cpu"], CORES),
    "(2) runner, 2 gloo processes x 1 thread": (DDP2, 1),
    f"(3) runner, 2 gloo processes x {CORES} threads": (DDP2, CORES),
}


SMOKE = {"n_train": 640, "n_val": 100, "n_test": 1001}


def dataset_overrides(args) -> list[str]:
    """The data of the evaluation commands (the test split, and no val split where it can be left out)."""
    if args.smoke:
        return ["dataset=patterns", *(f"dataset.{k}={v}" for k, v in SMOKE.items())]
    if args.mnist:
        return ["dataset=mnist_classes", f"dataset.root={args.mnist}", "dataset.n_val=0"]
    return ["dataset=fashion_mnist_classes", f"dataset.root={args.fashion}", "dataset.n_val=0"]


def load(args):
    """The same data as ``dataset_overrides``, built in this process."""
    from runner.data import mnist_classes, patterns

    if args.smoke:
        return patterns.build(**SMOKE)
    return (mnist_classes.mnist if args.mnist else mnist_classes.fashion_mnist)(root=args.mnist or args.fashion,
                                                                                n_val=0)


def family_with(weights, bundle):
    from runner.families.classification import build

    family = build(bundle, {"_target_": "runner.models.small_cnn.SmallCNN", "width": 32, "dropout": 0.0},
                   {"_target_": "runner.losses.classification.softmax_cross_entropy"})
    family.model.load_state_dict(weights)
    return family


def _timed_evaluation(rank: int, world: int, port: int, args, ckpt: str, threads: int, out) -> None:
    """One process of the in-process timing: evaluate() on the test split, barrier to barrier."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from runner.config import TrainerConfig
    from runner.engine import devices
    from runner.engine.evaluate import evaluate

    ctx = devices.resolve("ddp", backend="gloo") if world > 1 else devices.resolve("cpu")
    bundle = load(args)
    family = family_with(torch.load(ckpt, weights_only=True)["model"], bundle)
    trainer = TrainerConfig(batch_size=BATCH, eval_batch_size=BATCH)
    evaluate(family, bundle, "test", ctx, trainer)  # warm-up
    seconds = []
    for _ in range(args.repeats):
        ctx.barrier()
        start = time.perf_counter()
        metrics, count = evaluate(family, bundle, "test", ctx, trainer)
        ctx.barrier()
        seconds.append(time.perf_counter() - start)
    if rank == 0:
        out.put({"evaluate_s": statistics.median(seconds), "accuracy": metrics["test/accuracy"], "count": count})
    devices.shutdown()


def evaluate_in_processes(args, ckpt: str, world: int, threads: int) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    out = context.SimpleQueue()
    mp.start_processes(_timed_evaluation, args=(world, port, args, ckpt, threads, out), nprocs=world,
                       start_method="spawn")
    return out.get()


def hand_loop(args, ckpt: str) -> dict:
    """(a): the question's evaluation loop, timed the same way (median of the repeats)."""
    from torch.utils.data import DataLoader

    bundle = load(args)
    net = family_with(torch.load(ckpt, weights_only=True)["model"], bundle).model.eval()
    loader = DataLoader(bundle.test, batch_size=BATCH)
    seconds, correct = [], 0
    for repeat in range(args.repeats + 1):  # the first is the warm-up
        start, correct = time.perf_counter(), 0
        with torch.no_grad():
            for images, labels in loader:
                outputs = net(images)
                _, predicted = torch.max(outputs, 1)
                correct += (predicted == labels).sum().item()
        if repeat:
            seconds.append(time.perf_counter() - start)
    return {"evaluate_s": statistics.median(seconds), "accuracy": correct / len(bundle.test),
            "count": len(bundle.test)}


def runner_command(args, ckpt: str, devices: list[str], threads: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads in each process
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "runner", "experiment=classify", *dataset_overrides(args),
                           "mode=eval", f"ckpt_path={ckpt}", f"trainer.eval_batch_size={BATCH}",
                           "trainer.progress=none", *devices, f"output_root={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"runner exited with {done.returncode}: {done.stderr[-2000:]}")
    (run_dir,) = (out / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"command_s": wall, "accuracy": summary["metrics"]["test/accuracy"],
            "count": summary["eval_samples"]["test"]}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fashion", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--mnist", default=None, help="evaluate MNIST from this IDX folder instead")
    parser.add_argument("--train-batches", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="evaluate() calls per in-process timing")
    parser.add_argument("--smoke", action="store_true", help="5 training batches, 1 round, 1 repeat")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.smoke:
        args.train_batches, args.rounds, args.repeats = 5, 1, 1
    torch.set_num_threads(CORES)  # the hand loop's process, as torch sets it without OMP_NUM_THREADS
    train_data = [*dataset_overrides(args)[:-1], "dataset.n_val=1000"] if not args.smoke else dataset_overrides(args)
    summary, _ = run_runner("experiment=classify", *train_data, "device=cpu",
                            "trainer.max_epochs=1", f"trainer.limit_train_batches={args.train_batches}",
                            "trainer.progress=none")
    ckpt = str(Path(summary["run_dir"]) / "checkpoints" / "best.pt")
    print(f"trained {args.train_batches} batches in {summary['wall_time_s']:.0f} s: {ckpt}", flush=True)
    rows: dict[str, list[dict]] = {HAND: [], **{v: [] for v in VARIANTS}}
    for round_ in range(args.rounds):
        rows[HAND].append(hand_loop(args, ckpt))
        for name, (devices, threads) in VARIANTS.items():
            timed = evaluate_in_processes(args, ckpt, 2 if devices is DDP2 else 1, threads)
            command = runner_command(args, ckpt, devices, threads)
            rows[name].append({**timed, "command_s": command["command_s"],
                               "accuracies": [timed["accuracy"], command["accuracy"]],
                               "counts": [timed["count"], command["count"]]})
            print(f"round {round_ + 1} {name}: {json.dumps(rows[name][-1])}", flush=True)
    result = {"cpu": cpu_name(), "cores": CORES, "torch": torch.__version__, "train_batches": args.train_batches,
              "rounds": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    split = "patterns (smoke)" if args.smoke else "MNIST" if args.mnist else "Fashion-MNIST"
    n_test = len(load(args).test)
    print(f"\n{split} test split ({n_test:,} images), small CNN after {args.train_batches} training batches; "
          f"{CORES}-core CPU ({cpu_name()}), torch {torch.__version__}; medians of {args.rounds} rounds")
    print(f"{'variant':<48} {'test acc':>8} {'samples':>8} {'evaluate() s':>12} {'images/s':>9} {'command s':>9}")
    every_accuracy, every_count = set(), set()
    for name, runs in rows.items():
        accuracy = {a for r in runs for a in r.get("accuracies", [r["accuracy"]])}
        counts = {c for r in runs for c in r.get("counts", [r["count"]])}
        every_accuracy |= accuracy
        every_count |= counts
        evaluate_s = statistics.median(r["evaluate_s"] for r in runs)
        command = f"{statistics.median(r['command_s'] for r in runs):>9.1f}" if "command_s" in runs[0] else f"{'-':>9}"
        print(f"{name:<48} {'/'.join(f'{a:.4f}' for a in sorted(accuracy)):>8} "
              f"{'/'.join(map(str, sorted(counts))):>8} {evaluate_s:>12.2f} "
              f"{runs[0]['count'] / evaluate_s:>9,.0f} {command}")
    print(f"one accuracy in every run: {'yes' if len(every_accuracy) == 1 else 'NO: ' + str(sorted(every_accuracy))}; "
          f"every test image once: {'yes' if every_count == {n_test} else 'NO: ' + str(sorted(every_count))}")


if __name__ == "__main__":
    main()
