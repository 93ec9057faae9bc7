"""Where a training step's time goes on the GPU, for the two targets runner misses.

IWAE (k=50, batch 20, runner's model and bound, capturable fused Adam): the step captured in a
CUDA graph and replayed back to back with no Python loop around it — the ceiling of the graph
path, against which runner's measured rate shows its per-step host cost — with and without
``torch.compile`` and with fp32 or TF32 matrix products; plus the kernels of one step (count,
summed kernel time) from the profiler, so the gaps between kernels show.

DenseNet121 (224 px, batch 64, bf16 + channels_last, Adam): kernel time of one step by kind
(convolution, batch norm, concatenation, elementwise, optimizer), from the profiler.
Usage: python benchmarks/profile_steps.py [--only iwae|densenet]
"""
from __future__ import annotations

import argparse
import collections
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from common import captured, sync

DEVICE = torch.device("cuda")


def kernels_of(step, steps: int = 5) -> tuple[int, float, list[tuple[str, float]]]:
    """(kernels per step, kernel time per step in µs, [(kernel name, µs per step)] by time)."""
    for _ in range(3):
        step()
    sync(DEVICE)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync(DEVICE)
    return kernel_table(prof, steps)


def kernel_table(prof: profile, steps: int) -> tuple[int, float, list[tuple[str, float]]]:
    """The GPU kernels a finished profile recorded over ``steps`` steps: (kernels per step, kernel
    time per step in µs, [(kernel name, µs per step)] by time)."""
    times: dict[str, float] = collections.defaultdict(float)
    count = 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] += event.device_time / steps
            count += 1
    ranked = sorted(times.items(), key=lambda kv: -kv[1])
    return count // steps, sum(times.values()), ranked


def replay_rate(step, steps: int) -> float:
    """Steps/s of ``step`` captured once and replayed back to back."""
    replay = captured(step)
    for _ in range(20):
        replay()
    sync(DEVICE)
    start = time.perf_counter()
    for _ in range(steps):
        replay()
    sync(DEVICE)
    return steps / (time.perf_counter() - start)


def iwae_step(compiled: bool):
    from runner.losses.iwae import IWAE
    from runner.models.vae import VAE

    torch.manual_seed(0)
    model = VAE(x_dim=784, latent_dims=[50], hidden_dims=[[200, 200]]).to(DEVICE)
    forward = torch.compile(model) if compiled else model
    bound = IWAE(k=50)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=torch.tensor(1e-3, device=DEVICE), eps=1e-4, capturable=True, fused=True)
    data = (torch.rand(20, 784, device=DEVICE) < 0.3).float()

    def step() -> None:
        loss = bound(forward(torch.bernoulli(data), 50)).sum()
        loss.backward()
        torch._foreach_mul_([p.grad for p in params], 1 / 20)
        opt.step()
        opt.zero_grad(set_to_none=False)

    return step


def iwae() -> dict:
    r = {}
    for compiled in (False, True):
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            name = ("compile" if compiled else "eager") + ("_tf32" if tf32 else "_fp32")
            step = iwae_step(compiled)
            count, kernel_us, ranked = kernels_of(step)
            rate = replay_rate(iwae_step(compiled), 5000)
            r[name] = {"graph_replay_steps_s": rate, "graph_us_per_step": 1e6 / rate, "kernels_per_step": count,
                       "kernel_us_per_step": kernel_us, "top": [(n[:70], round(t, 1)) for n, t in ranked[:8]]}
            print(f"IWAE {name}: replay {rate:,.0f} steps/s ({1e6 / rate:.0f} µs), {count} kernels, "
                  f"{kernel_us:.0f} µs of kernel time per step", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    return r


def kind(name: str) -> str:
    n = name.lower()
    for key, label in (("conv", "convolution"), ("gemm", "matmul"), ("xmma", "convolution"), ("sm90", "matmul"),
                       ("cudnn", "convolution"), ("batch_norm", "batchnorm"), ("bn_", "batchnorm"),
                       ("welford", "batchnorm"), ("cat", "concatenation"), ("adam", "optimizer"),
                       ("foreach", "optimizer"), ("elementwise", "elementwise"), ("reduce", "reduction")):
        if key in n:
            return label
    return "other"


def densenet() -> dict:
    from runner.models.torchvision_models import build as torchvision_model

    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    net = torchvision_model("densenet121", num_outputs=4).to(DEVICE).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    x = torch.randn(64, 3, 224, 224, device=DEVICE).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(64, 4, device=DEVICE) < 0.3).float()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    sync(DEVICE)
    start = time.perf_counter()
    for _ in range(20):
        step()
    sync(DEVICE)
    wall_ms = (time.perf_counter() - start) / 20 * 1e3
    count, kernel_us, ranked = kernels_of(step, 3)
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, t in ranked:
        by_kind[kind(name)] += t / 1e3
    r = {"wall_ms_per_step": wall_ms, "img_s": 64 / wall_ms * 1e3, "kernels_per_step": count,
         "kernel_ms_per_step": kernel_us / 1e3, "ms_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
         "top": [(n[:90], round(t / 1e3, 2)) for n, t in ranked[:12]]}
    print(f"DenseNet121 bf16+CL b64 eager: {wall_ms:.1f} ms/step wall, {count} kernels, "
          f"{kernel_us / 1e3:.1f} ms kernel time", flush=True)
    return r


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["iwae", "densenet"], default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    r = {"gpu": torch.cuda.get_device_name(DEVICE), "torch": torch.__version__}
    if args.only in (None, "iwae"):
        r["iwae"] = iwae()
    if args.only in (None, "densenet"):
        r["densenet"] = densenet()
    print(json.dumps(r, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
