"""Images from files: JPEG decoding on CPU workers against nvJPEG on the GPU, for multilabel_csv.

Writes N JPEGs of ImageNet's typical size (500x375, quality 90; smooth shapes plus sensor-like
noise, so the files are as large as photos), then measures, on one GPU:

1. the input pipeline alone (no model): runner's ``multilabel_csv`` dataset with
   ``decode=cpu`` (workers decode, resize to 224 px; the GPU normalises) at several worker
   counts, and ``decode=device`` (workers read the files; each batch is decoded by
   ``torchvision.io.decode_jpeg(device='cuda')`` and resized on the GPU). Images/s, one epoch,
   synchronised;
2. DenseNet121 training at 224 px, batch 64, bf16 + channels_last, eager and with the step in a
   CUDA graph, through runner fed from these files both ways, against the same training fed
   from memory (``data_on_device``): how much of the GPU the pipeline keeps busy. These runs
   set ``dataset.train_transforms=null`` (no augmentation), as they were first measured.

``--augmentation`` measures instead, the same way, the training with and without augmentation:
``dataset.train_transforms`` null against the config's default (RandomResizedCrop to 224 px,
scale 0.5-1, + RandomHorizontalFlip, per sample in the workers — or, with ``decode=device``,
per sample on the GPU after the batched decode), for the pipeline alone and for the captured
DenseNet121 step. ``--smoke``: 32 files, 32 px, batch 8, 4 steps, on the CPU when there is no
GPU (fp32, eager): to see it run before spending GPU time.
Usage: python benchmarks/jpeg_decode.py [--n 2048] [--steps 48] [--out FILE] [--augmentation] [--smoke]
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.io import encode_jpeg

from common import device_ceilings, run_runner, steady_rate, sync, table

SIZE, BATCH = 224, 64
NO_AUGMENTATION = ("dataset.train_transforms=null",)
# The config's default train_transforms (runner/conf/dataset/multilabel_csv.yaml), for the pipeline alone.
CROP_FLIP = [{"_target_": "torchvision.transforms.v2.RandomResizedCrop", "size": SIZE, "scale": [0.5, 1.0]},
             {"_target_": "torchvision.transforms.v2.RandomHorizontalFlip"}]


def write_jpegs(folder: Path, n: int) -> tuple[str, float]:
    """n photo-sized JPEGs and a CSV with 4 random labels; (csv path, mean file size in kB)."""
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows, total = [], 0
    for i in range(n):
        smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16, generator=g), size=(375, 500), mode="bicubic")
        noise = torch.randn(1, 3, 375, 500, generator=g) * 0.04
        image = ((smooth + noise).clamp(0, 1)[0] * 255).round().to(torch.uint8)
        data = encode_jpeg(image, quality=90)
        (folder / f"{i}.jpg").write_bytes(data.numpy().tobytes())
        total += data.numel()
        labels = (torch.rand(4, generator=g) < torch.tensor([0.08, 0.29, 0.17, 0.47])).int().tolist()
        rows.append(f"{i}.jpg," + ",".join(map(str, labels)))
    csv = folder / "all.csv"
    csv.write_text("path,a,b,c,d\n" + "\n".join(rows) + "\n")
    return str(csv), total / n / 1e3


def pipeline_rate(csv: str, folder: Path, decode: str, workers: int, device: torch.device,
                  transforms: list | None = None) -> float:
    """Images/s of one pass over the files: loader, copy, decode where asked, the transforms
    (each item under its index's seed), resize, normalise."""
    from runner.data import multilabel_csv
    from runner.engine import data as loaders

    dataset = multilabel_csv.build(csv=csv, image_dir=str(folder), image_size=SIZE, decode=decode,
                                   train_transforms=transforms).train
    move = loaders.batch_mover(dataset, None, device)
    loader = loaders.eval_loader(dataset, batch_size=BATCH, rank=0, world=1, prebatched=False, num_workers=workers,
                                 pin=device.type == "cuda")
    for i, batch in enumerate(loader):  # warm-up: worker start, nvJPEG handles, cuDNN-free resize kernels
        move(batch)
        if i == 2:
            break
    sync(device)
    start = time.perf_counter()
    for batch in loader:
        images, _ = move(batch)
    sync(device)
    return len(dataset) / (time.perf_counter() - start)


GRAPH = ("trainer.cuda_graph=true",)
# ("device=cpu",) in --smoke off a GPU
ON_DEVICE = ("device=gpu", "trainer.precision=bf16", "trainer.channels_last=true")


def runner_from_files(csv: str, folder: Path, steps: int, decode: str, workers: int, *extra: str) -> float:
    _, rows = run_runner("experiment=focal_densenet", "dataset=multilabel_csv", f"dataset.csv={csv}",
                         f"dataset.image_dir={folder}", f"dataset.image_size={SIZE}", f"dataset.decode={decode}",
                         f"trainer.num_workers={workers}", f"trainer.batch_size={BATCH}", *ON_DEVICE,
                         f"trainer.max_steps={steps}", f"trainer.log_every_n_steps={max(steps // 6, 1)}",
                         "trainer.progress=none", "trainer.val_every_n_steps=0", "trainer.max_epochs=100", *extra)
    return steady_rate(rows, "samples", skip=2)


def runner_from_memory(steps: int, *extra: str) -> float:
    _, rows = run_runner("experiment=focal_densenet", f"dataset.image_size={SIZE}", "dataset.n_train=2048",
                         "dataset.n_val=64", "dataset.n_test=64", f"trainer.batch_size={BATCH}", *ON_DEVICE,
                         "trainer.data_on_device=true", f"trainer.max_steps={steps}",
                         f"trainer.log_every_n_steps={max(steps // 6, 1)}", "trainer.progress=none",
                         "trainer.val_every_n_steps=0", "trainer.max_epochs=100", *extra)
    return steady_rate(rows, "samples", skip=2)


def augmentation(csv: str, folder: Path, steps: int, device: torch.device, settings: list[tuple[str, int]],
                 graph: tuple[str, ...], r: dict) -> None:
    """Pipeline and training rates without and with the default crop + flip, side by side."""
    pipeline, training = {}, {"memory": runner_from_memory(steps, *graph)}
    print(f"training from memory: {training['memory']:,.0f} img/s", flush=True)
    for decode, workers in settings:
        for tag, transforms, extra in (("", None, NO_AUGMENTATION), ("+aug", CROP_FLIP, ())):
            key = f"{decode}_{workers}w{tag}"
            pipeline[key] = pipeline_rate(csv, folder, decode, workers, device, transforms)
            training[key] = runner_from_files(csv, folder, steps, decode, workers, *graph, *extra)
            print(f"decode={decode} workers={workers}{tag}: pipeline {pipeline[key]:,.0f} img/s, "
                  f"training {training[key]:,.0f} img/s", flush=True)
    r["augmentation"] = {"pipeline_img_s": pipeline, "training_img_s": training}
    print(json.dumps(r, indent=2))
    print(f"JPEG training with and without augmentation (crop + flip), {r['n']} files of {r['mean_file_kb']:.0f} kB, "
          f"{SIZE} px, batch {BATCH}, on {r['ceilings'].get('gpu', 'the CPU')}, {os.cpu_count()} CPU cores")
    print(f"{'variant':<28} {'pipeline img/s':>15} {'training img/s':>15} {'of memory':>10}")
    print(f"{'data in device memory':<28} {'-':>15} {training['memory']:>15,.0f} {1:>10.0%}")
    for key, rate in pipeline.items():
        print(f"{key.replace('_', ' ').replace('w+aug', 'w +aug'):<28} {rate:>15,.0f} {training[key]:>15,.0f} "
              f"{training[key] / training['memory']:>10.0%}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--out", default=None)
    parser.add_argument("--augmentation", action="store_true", help="only: training with and without augmentation")
    parser.add_argument("--smoke", action="store_true", help="tiny settings (on the CPU without a GPU)")
    args = parser.parse_args()
    faulthandler.dump_traceback_later(540, exit=True)  # a hang prints where it is instead of eating the call
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    graph, settings = GRAPH, [("cpu", 8), ("cpu", 15), ("device", 4)]
    if args.smoke:
        global SIZE, BATCH, ON_DEVICE
        SIZE, BATCH, args.n, args.steps = 32, 8, 32, 4
        CROP_FLIP[0]["size"] = SIZE
        settings = [("cpu", 2), ("device", 2)]
        if device.type == "cpu":
            ON_DEVICE, graph = ("device=cpu",), ()
    torch.backends.cudnn.benchmark = True
    r: dict = {"ceilings": device_ceilings(device), "cpu_cores": os.cpu_count(), "n": args.n}
    folder = Path(tempfile.mkdtemp(prefix="jpegs-"))
    start = time.perf_counter()
    csv, r["mean_file_kb"] = write_jpegs(folder, args.n)
    print(f"wrote {args.n} JPEGs ({r['mean_file_kb']:.0f} kB each) in {time.perf_counter() - start:.0f} s", flush=True)
    if args.augmentation:
        augmentation(csv, folder, args.steps, device, settings, graph, r)
        if args.out:
            Path(args.out).write_text(json.dumps(r, indent=2))
        return
    pipeline = {}
    for decode, workers in (("cpu", 4), ("cpu", 8), ("cpu", 15), ("device", 2), ("device", 4)):
        pipeline[f"{decode}_{workers}w"] = pipeline_rate(csv, folder, decode, workers, device)
        print(f"pipeline decode={decode} workers={workers}: {pipeline[f'{decode}_{workers}w']:,.0f} img/s", flush=True)
    r["pipeline_img_s"] = pipeline
    training = {}
    for graph in ((), GRAPH):  # eager (launch-bound, ~1,000 img/s) and the captured step (faster)
        tag = "+graph" if graph else ""
        training[f"memory{tag}"] = runner_from_memory(args.steps, *graph)
        print(f"training from memory{tag}: {training[f'memory{tag}']:,.0f} img/s", flush=True)
        for decode, workers in (("cpu", 8), ("cpu", 15), ("device", 2), ("device", 4)):
            key = f"{decode}_{workers}w{tag}"
            training[key] = runner_from_files(csv, folder, args.steps, decode, workers, *graph, *NO_AUGMENTATION)
            print(f"training decode={decode} workers={workers}{tag}: {training[key]:,.0f} img/s", flush=True)
    r["training_img_s"] = training
    print(json.dumps(r, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2))
    print(f"JPEG pipeline, {args.n} files of {r['mean_file_kb']:.0f} kB, to 224 px, on {r['ceilings'].get('gpu')}, "
          f"{os.cpu_count()} CPU cores")
    best_cpu = max(v for k, v in pipeline.items() if k.startswith("cpu"))
    print(table([(f"decode={k.replace('_', ' workers=')}", v, "img/s") for k, v in pipeline.items()], best_cpu))
    print("DenseNet121 bf16+CL batch 64 training, ratio against the data held in GPU memory:")
    for tag in ("", "+graph"):
        print(table([(f"from {k}", v, "img/s") for k, v in training.items() if k.endswith(tag) and
                     ("+graph" in k) == bool(tag)], training[f"memory{tag}"]))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
