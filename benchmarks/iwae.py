"""IWAE, one stochastic layer, batch 20, k=50, Adam: three ways, same work, one GPU.

(a) the practitioners' loop: fp32, eager, the encoder run k times over repeated data, a
    DataLoader, ``loss.item()`` every step;
(b) PyTorch Lightning's Trainer (32-true) on runner's model and bound, fed by a DataLoader;
(c) runner through its configs: ``experiment=iwae_mnist`` at batch 20, eager, then with the
    data on the GPU and the whole step in one CUDA graph (the iwae_paper default).
Usage: python benchmarks/iwae.py [--steps N] [--mnist DIR] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common import (ROOT, device_ceilings, import_lightning, lightning_module, lightning_rate, rate, run_runner,
                    steady_rate, table)

BATCH, K, LATENT = 20, 50, 50


class PractitionerIWAE(nn.Module):
    """The common hand-written IWAE: x repeated k times through the encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(784, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 2 * LATENT))
        self.dec = nn.Sequential(nn.Linear(LATENT, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 784))

    def loss(self, x: torch.Tensor, k: int) -> torch.Tensor:
        xk = x.repeat(k, 1)
        mu, logvar = self.enc(xk).chunk(2, -1)
        eps = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * eps
        logits = self.dec(z)
        log_px = -nn.functional.binary_cross_entropy_with_logits(logits, xk, reduction="none").sum(-1)
        log_pz = -0.5 * (z**2 + math.log(2 * math.pi)).sum(-1)
        log_qz = -0.5 * (eps**2 + logvar + math.log(2 * math.pi)).sum(-1)
        log_w = (log_px + log_pz - log_qz).view(k, -1)
        w = torch.softmax(log_w, 0).detach()
        return -(w * log_w).sum(0).mean()


def mnist_pixels(root: str, quick: bool) -> torch.Tensor:
    from runner.data.binarized import mnist

    bundle = mnist(root=root, n_val=0)
    pixels = bundle.train.pixels
    return pixels[:2000] if quick else pixels


def practitioners(pixels: torch.Tensor, device: torch.device, steps: int) -> float:
    torch.manual_seed(0)
    model = PractitionerIWAE().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
    loader = DataLoader(TensorDataset(pixels), batch_size=BATCH, shuffle=True, drop_last=True)
    it = iter(loader)

    def run(n: int) -> None:
        nonlocal it
        for _ in range(n):
            try:
                (x,) = next(it)
            except StopIteration:
                it = iter(loader)
                (x,) = next(it)
            x = torch.bernoulli(x.to(device))
            loss = model.loss(x, K)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()

    return rate(run, steps, warmup=50, device=device)


def lightning(pixels: torch.Tensor, device: torch.device, steps: int) -> float | None:
    L = import_lightning()
    if L is None:
        return None
    from runner.losses.iwae import IWAE
    from runner.models.vae import VAE

    bound = IWAE(k=K)
    module = lightning_module(L, VAE(x_dim=784, latent_dims=[LATENT], hidden_dims=[[200, 200]]),
                              lambda net, batch: bound(net(torch.bernoulli(batch[0]), K)).mean(),
                              lambda params: torch.optim.Adam(params, lr=1e-3, eps=1e-4))

    loader = DataLoader(TensorDataset(pixels), batch_size=BATCH, shuffle=True, drop_last=True)
    return lightning_rate(L, module, loader, device, steps, warmup=100, precision="32-true")


def runner_rate(mnist_root: str, steps: int, *extra: str) -> float:
    _, rows = run_runner("experiment=iwae_mnist", f"dataset.root={mnist_root}", "dataset.n_val=0",
                         "trainer.batch_size=20", "loss.k=50", "loss.eval_k=50", "trainer.progress=none",
                         f"trainer.max_steps={steps}", f"trainer.log_every_n_steps={max(steps // 10, 1)}",
                         "trainer.eval_batch_size=1000", *extra)
    return steady_rate(rows, "samples", skip=2) / BATCH


def tf32_check(mnist_root: str, last_stage: int) -> dict[str, float]:
    """Test NLL (k=5000, full fp32 evaluation) after the paper's schedule cut at ``last_stage``,
    trained in fp32 and in TF32, two seeds each: does TF32 training move the result by more than
    a change of seed does?"""
    nll = {}
    for precision in ("32", "tf32"):
        for seed in (0, 1):
            summary, _ = run_runner("experiment=iwae_paper", f"dataset.root={mnist_root}", "device=gpu",
                                    f"schedule.last_stage={last_stage}", f"trainer.precision={precision}",
                                    f"trainer.seed={seed}", "trainer.progress=none")
            nll[f"{precision}_seed{seed}"] = summary["metrics"]["test/nll_k5000"]
            print(f"precision={precision} seed={seed}: test NLL {nll[f'{precision}_seed{seed}']:.3f} "
                  f"({summary['throughput'] / BATCH:,.0f} steps/s over the run)", flush=True)
    return nll


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--mnist", default=str(ROOT / ".gpu_data" / "mnist"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tf32-check", type=int, default=None, metavar="LAST_STAGE",
                        help="only compare fp32 and TF32 training on the paper's schedule cut at this stage")
    args = parser.parse_args()
    if args.tf32_check is not None:
        print(json.dumps(tf32_check(args.mnist, args.tf32_check), indent=2))
        return
    device = torch.device("cuda")
    ceilings = device_ceilings(device)
    pixels = mnist_pixels(args.mnist, args.quick)
    results = {"ceilings": ceilings}
    results["a_practitioners"] = practitioners(pixels, device, args.steps)
    results["b_lightning"] = lightning(pixels, device, args.steps)
    results["c_runner_eager"] = runner_rate(args.mnist, args.steps, "device=gpu")
    results["c_runner_graph"] = runner_rate(args.mnist, args.steps * 10, "device=gpu", "trainer.cuda_graph=true",
                                            "trainer.data_on_device=true")
    results["c_runner_graph_compile"] = runner_rate(args.mnist, args.steps * 10, "device=gpu", "trainer.cuda_graph=true",
                                                    "trainer.data_on_device=true", "trainer.compile=true")
    results["c_runner_graph_compile_tf32"] = runner_rate(args.mnist, args.steps * 10, "device=gpu",
                                                         "trainer.cuda_graph=true", "trainer.data_on_device=true",
                                                         "trainer.compile=true", "trainer.precision=tf32")
    results["c_runner_iwae_paper_path"] = runner_rate(args.mnist, args.steps * 10, "device=gpu",
                                                      "trainer.cuda_graph=true", "trainer.data_on_device=true",
                                                      "trainer.compile=true", "trainer.precision=tf32",
                                                      "trainer.steps_per_graph=10")
    best = max(v for k, v in results.items() if k.startswith("c_runner"))
    paper_steps = 3280 * 60000 // BATCH
    results["paper_schedule_hours_at_a"] = paper_steps / results["a_practitioners"] / 3600
    results["paper_schedule_hours_at_c"] = paper_steps / best / 3600
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    rows = [("(a) practitioners' loop", results["a_practitioners"], "steps/s")]
    if results["b_lightning"]:
        rows.append(("(b) Lightning 32-true", results["b_lightning"], "steps/s"))
    rows += [("(c) runner eager", results["c_runner_eager"], "steps/s"),
             ("(c) runner cuda_graph+data_on_device", results["c_runner_graph"], "steps/s"),
             ("(c) runner cuda_graph+data_on_device+compile", results["c_runner_graph_compile"], "steps/s"),
             ("(c) runner the above + precision=tf32", results["c_runner_graph_compile_tf32"], "steps/s"),
             ("(c) runner the above + steps_per_graph=10", results["c_runner_iwae_paper_path"], "steps/s")]
    print(f"IWAE k=50 batch 20 on {ceilings.get('gpu')} (torch {ceilings.get('torch')})")
    print(table(rows, results["a_practitioners"]))
    print(f"paper schedule (9.84M steps): {results['paper_schedule_hours_at_a']:.1f} h at (a), "
          f"{results['paper_schedule_hours_at_c'] * 60:.0f} min at (c)'s best")


if __name__ == "__main__":
    main()
