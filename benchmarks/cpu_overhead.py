"""runner's overhead on the CPU: the default experiment's training (focal_densenet on shapes,
32 px, batch 64) through runner against a hand-written loop doing the same work — same data,
model, loss, optimizer and batch order — timed over the same number of steps, alternating the
two so that machine noise hits both. Usage: python benchmarks/cpu_overhead.py [--steps N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import run_runner


def hand_loop(steps: int) -> float:
    """Samples/s of the loop a practitioner writes for this experiment (no eval, no logging)."""
    from runner.data.shapes import build
    from runner.engine.data import train_order
    from runner.losses.multilabel import FocalLoss
    from runner.models.torchvision_models import build as torchvision_model

    torch.manual_seed(0)
    bundle = build(n_train=3000, n_val=800, n_test=800, image_size=32)
    x, y = bundle.train.tensors
    model = torchvision_model("densenet121", num_outputs=4)
    loss_fn = FocalLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = train_order(len(x), seed=0, epoch=0)
    start = time.perf_counter()
    for i in range(steps):
        idx = order[i * 64:(i + 1) * 64]
        loss = loss_fn(model(x[idx]), y[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()
    return steps * 64 / (time.perf_counter() - start)


def runner_rate(steps: int) -> float:
    summary, _ = run_runner("device=cpu", "trainer.progress=none", f"trainer.max_steps={steps}",
                            f"trainer.log_every_n_steps={steps}")
    return summary["throughput"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    hand, ours = [], []
    for _ in range(args.rounds):
        hand.append(hand_loop(args.steps))
        ours.append(runner_rate(args.steps))
    h, r = statistics.median(hand), statistics.median(ours)
    print(f"hand loop {h:.1f} samples/s, runner {r:.1f} samples/s (median of {args.rounds}): "
          f"runner overhead {100 * (h / r - 1):+.1f}%")
    print("hand:", [round(v, 1) for v in hand], "runner:", [round(v, 1) for v in ours])


if __name__ == "__main__":
    main()
