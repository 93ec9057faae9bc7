"""The first practitioner's question on one GPU: the evaluation loop they wrote (fp32, a
DataLoader, ``outputs = net(images); _, predicted = torch.max(outputs, 1)``, ``.item()`` per
batch) against runner's evaluation (bf16, channels_last, the split resident on the GPU) of the
same trained network on Fashion-MNIST's 10,000 test images: images/s side by side, and whether
the two make the same decisions.

The network is fashion_resnet's ResNet-18, trained for ``--epochs`` epochs through runner first.
``--smoke`` (on a GPU or, to see that it runs, on the CPU): the network trained for one epoch on
256 images of the embedded patterns set, evaluated on the first 256 Fashion-MNIST test images.
Usage: python benchmarks/classification_eval.py [--fashion DIR] [--epochs N] [--out FILE] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from common import ROOT, device_ceilings, run_runner, sync

BATCH = 1000


def timed(fn, device: torch.device, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` after one warm-up, synchronised before reading the clock."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fashion", default=str(ROOT / ".gpu_data" / "fashion-mnist"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny: to see it run (also on the CPU)")
    args = parser.parse_args()
    from runner.config import TrainerConfig
    from runner.data.mnist_classes import fashion_mnist
    from runner.engine.devices import DeviceContext
    from runner.engine.evaluate import evaluate
    from runner.families.classification import build as build_family

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on = "device=gpu" if device.type == "cuda" else "device=cpu"
    data = (["dataset=patterns", "dataset.n_train=256", "dataset.n_val=64", "dataset.n_test=64"] if args.smoke
            else [f"dataset.root={args.fashion}"])
    epochs = 1 if args.smoke else args.epochs
    summary, _ = run_runner("experiment=fashion_resnet", *data, on, f"trainer.max_epochs={epochs}", "trainer.progress=none")
    weights = torch.load(Path(summary["run_dir"]) / "checkpoints" / "best.pt", weights_only=True)["model"]
    bundle = fashion_mnist(root=args.fashion)
    batch, repeats = (64, 1) if args.smoke else (BATCH, 5)
    if args.smoke:  # patterns and Fashion-MNIST are both 10 classes of grey 28 px images: the weights fit
        bundle.test = TensorDataset(*(t[:256] for t in bundle.test.tensors))
    family = build_family(bundle, {"_target_": "runner.models.cifar_resnet.build", "name": "resnet18"},
                          {"_target_": "runner.losses.classification.softmax_cross_entropy"})
    family.model.load_state_dict(weights)
    family.to(device)
    net = family.model.eval()
    images, labels = bundle.test.tensors

    # (a) the question's loop: fp32, a DataLoader with pinned memory, one host read per batch
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch, num_workers=4,
                        pin_memory=device.type == "cuda")
    hand_predictions = []

    def hand() -> None:
        hand_predictions.clear()
        correct = 0
        with torch.no_grad():
            for x, y in loader:
                outputs = net(x.to(device))
                _, predicted = torch.max(outputs, 1)
                correct += (predicted == y.to(device)).sum().item()
                hand_predictions.append(predicted.cpu())
        hand.accuracy = correct / len(labels)

    hand_s = timed(hand, device, repeats)
    hand_decisions = torch.cat(hand_predictions)

    # (c) runner's evaluation of the same network
    ctx = DeviceContext(device, "gpu" if device.type == "cuda" else "cpu")
    results = {}
    for precision, channels_last, key in (("bf16", True, "c_bf16_cl"), ("32", False, "c_fp32")):
        family.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        trainer = TrainerConfig(batch_size=batch, eval_batch_size=batch, precision=precision, data_on_device=True)
        seconds = timed(lambda: evaluate(family, bundle, "test", ctx, trainer), device, repeats)
        metrics, count = evaluate(family, bundle, "test", ctx, trainer)
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            decisions = torch.cat([family.predict((images[i:i + batch].to(device),))["predicted"].cpu()
                                   for i in range(0, len(images), batch)])
        results[key] = {"images_per_s": count / seconds, "accuracy": metrics["test/accuracy"],
                        "same_decisions": float((decisions == hand_decisions).float().mean())}
    results["a_hand_fp32"] = {"images_per_s": len(labels) / hand_s, "accuracy": hand.accuracy}
    results["ceilings"] = device_ceilings(device)
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    a = results["a_hand_fp32"]["images_per_s"]
    trained = "1 epoch of 256 patterns (smoke)" if args.smoke else f"{args.epochs} epochs"
    where = results["ceilings"].get("gpu", f"the CPU ({torch.get_num_threads()} threads)")
    print(f"Fashion-MNIST test ({len(labels):,} images), ResNet-18 after {trained}, on {where}")
    print(f"{'variant':<40} {'images/s':>10} {'vs (a)':>7} {'accuracy':>9} {'same decisions':>15}")
    print(f"{'(a) hand loop fp32, DataLoader, .item()':<40} {a:>10,.0f} {1:>6.2f}x {results['a_hand_fp32']['accuracy']:>9.4f}")
    for key, name in (("c_fp32", "(c) runner fp32, data on device"), ("c_bf16_cl", "(c) runner bf16+CL, data on device")):
        r = results[key]
        print(f"{name:<40} {r['images_per_s']:>10,.0f} {r['images_per_s'] / a:>6.2f}x {r['accuracy']:>9.4f} "
              f"{r['same_decisions']:>15.4f}")


if __name__ == "__main__":
    main()
