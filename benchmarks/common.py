"""Shared pieces of the side-by-side benchmarks: the device's two ceilings, timing, and running
runner in-process through its own configs."""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_ceilings(device: torch.device) -> dict[str, float]:
    """A large bf16 matrix product (TFLOP/s) and a large device copy (TB/s, read + write),
    on random data, median of 10 after 3 warm-ups."""
    if device.type != "cuda":
        return {}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    src = torch.randn(2**30 // 4, device=device)  # 1 GiB
    dst = torch.empty_like(src)

    def timed(fn: Callable[[], Any]) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    matmul_s = timed(lambda: a @ b)
    copy_s = timed(lambda: dst.copy_(src))
    return {"bf16_tflops": 2 * n**3 / matmul_s / 1e12, "copy_tbps": 2 * src.numel() * 4 / copy_s / 1e12,
            "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__}


def rate(fn: Callable[[int], None], steps: int, warmup: int, device: torch.device, repeats: int = 3) -> float:
    """Steps per second of ``fn(steps)`` (which runs that many steps), best of ``repeats`` after
    ``warmup`` steps; synchronised before reading the clock."""
    fn(warmup)
    sync(device)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn(steps)
        sync(device)
        best = max(best, steps / (time.perf_counter() - start))
    return best


def run_runner(*overrides: str) -> tuple[dict, list[dict]]:
    """Run ``python -m runner <overrides>`` in this process (runner's Python API); (summary.json,
    metrics.jsonl rows)."""
    from runner import run

    summary = run([*overrides, f"output_root={tempfile.mkdtemp(prefix='bench-run-')}"])
    if summary["exit_code"] != 0:
        raise RuntimeError(f"runner exited with {summary['exit_code']}: {summary.get('error')}")
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def steady_rate(rows: list[dict], unit: str, skip: int = 1) -> float:
    """Median training rate between logging points, leaving out the first ``skip`` windows
    (warm-up, graph capture, compilation)."""
    rates = [r[f"{unit}_per_s"] for r in rows if r["split"] == "train"][skip:]
    return statistics.median(rates)


def table(rows: list[tuple[str, float, str]], reference: float) -> str:
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'variant':<{width}}  {'rate':>12}  ratio vs (a)"]
    for name, value, unit in rows:
        lines.append(f"{name:<{width}}  {value:>12,.1f} {unit}  {value / reference:5.2f}x")
    return "\n".join(lines)


def import_lightning():
    """PyTorch Lightning (either package name), or None where it is not installed."""
    for name in ("lightning", "pytorch_lightning"):
        try:
            return __import__(name)
        except ImportError:
            pass
    return None


def lightning_module(L, net: torch.nn.Module, loss: Callable[[torch.nn.Module, Any], torch.Tensor],
                     optimizer: Callable[[Any], torch.optim.Optimizer]):
    """A LightningModule training ``net`` with ``loss(net, batch)`` and ``optimizer(parameters)``."""

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, _):
            return loss(self.net, batch)

        def configure_optimizers(self):
            return optimizer(self.parameters())

    return Module()


def lightning_rate(L, module, loader, device: torch.device, steps: int, warmup: int, precision: str) -> float:
    """Optimizer steps per second of Lightning's Trainer.fit, timed between two global steps
    (after ``warmup``) by a callback that synchronises before reading the clock."""
    times: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step in (warmup, steps + warmup):
                sync(device)
                times.append(time.perf_counter())

    trainer = L.Trainer(max_steps=steps + warmup, accelerator="gpu", devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Clock()], max_epochs=-1)
    trainer.fit(module, loader)
    return steps / (times[1] - times[0])


def captured(call):
    """``call`` captured in a CUDA graph after three warm-up calls on a side stream; the replay."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay
