"""DenseNet121, 224 px, 4 labels: training at batch 64 and evaluation at batch 256, side by side.

(a) the hand-written loop: fp32, eager, a DataLoader, ``loss.item()`` every step;
(b) Lightning's Trainer, bf16-mixed and 32-true, fed by the same DataLoader;
(c) runner through its configs (focal_densenet at 224 px), in the variants that matter: bf16 with
    channels_last, torch.compile, and the whole step captured in a CUDA graph (the step is
    launch-bound: ~2,600 kernels, benchmarks/profile_steps.py).
Evaluation: (a) fp32 with ``.item()`` per batch against runner's ``evaluate`` in bf16 +
channels_last, with the predictions compared.
Usage: python benchmarks/densenet.py [--steps N]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common import (device_ceilings, import_lightning, lightning_module, lightning_rate, rate, run_runner, steady_rate,
                    sync, table)

SIZE, BATCH, EVAL_BATCH, N = 224, 64, 256, 2048


def data() -> TensorDataset:
    from runner.data.shapes import make_shapes

    images, labels = make_shapes(N, SIZE, [0.08, 0.29, 0.17, 0.47], torch.Generator().manual_seed(0))
    return TensorDataset(images, labels)


def model(device: torch.device) -> nn.Module:
    from runner.models.torchvision_models import build as torchvision_model

    torch.manual_seed(0)
    return torchvision_model("densenet121", num_outputs=4).to(device)


def hand_loop(dataset: TensorDataset, device: torch.device, steps: int) -> tuple[float, nn.Module]:
    net = model(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=4, pin_memory=True,
                        persistent_workers=True)
    it = iter(loader)

    def run(n: int) -> None:
        nonlocal it
        for _ in range(n):
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(loader)
                x, y = next(it)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = nn.functional.binary_cross_entropy_with_logits(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()

    return rate(run, steps, warmup=10, device=device, repeats=2) * BATCH, net


def lightning(dataset: TensorDataset, device: torch.device, steps: int, precision: str) -> float | None:
    L = import_lightning()
    if L is None:
        return None

    module = lightning_module(L, model(torch.device("cpu")),
                              lambda net, batch: nn.functional.binary_cross_entropy_with_logits(net(batch[0]), batch[1]),
                              lambda params: torch.optim.Adam(params, lr=1e-3))
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=4, pin_memory=True,
                        persistent_workers=True)
    return lightning_rate(L, module, loader, device, steps, warmup=10, precision=precision) * BATCH


def runner_train(steps: int, *extra: str) -> float:
    _, rows = run_runner("experiment=focal_densenet", f"dataset.image_size={SIZE}", f"dataset.n_train={N}",
                         "dataset.n_val=256", "dataset.n_test=256", f"trainer.batch_size={BATCH}", "device=gpu",
                         f"trainer.max_steps={steps}", f"trainer.log_every_n_steps={max(steps // 6, 1)}",
                         "trainer.progress=none", "trainer.val_every_n_steps=0", *extra)
    result = steady_rate(rows, "samples", skip=2)
    print(f"(c) runner {' '.join(extra) or 'fp32'}: {result:,.0f} img/s", flush=True)
    return result


def evaluation(dataset: TensorDataset, device: torch.device, net: nn.Module) -> dict[str, float]:
    """(a) fp32 with .item() per batch, against runner's evaluate in bf16 + channels_last, on the
    network the hand loop trained (an untrained DenseNet's eval-mode outputs are noise)."""
    from runner.config import TrainerConfig
    from runner.engine.devices import DeviceContext
    from runner.engine.evaluate import evaluate
    from runner.engine.family import DataBundle
    from runner.families.multilabel import build as build_family

    net.eval()
    loader = DataLoader(dataset, batch_size=EVAL_BATCH, num_workers=4, pin_memory=True)
    outputs = []

    def hand(_: int) -> None:
        outputs.clear()
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                logits = net(x)
                nn.functional.binary_cross_entropy_with_logits(logits, y).item()
                outputs.append(logits.float().cpu())

    hand_rate = rate(hand, 1, warmup=1, device=device, repeats=3) * len(dataset)
    reference = torch.cat(outputs)
    on_device = [t.to(device) for t in dataset.tensors]

    def hand_resident(_: int) -> None:  # the same loop with the images already on the GPU
        with torch.no_grad():
            for start in range(0, len(dataset), EVAL_BATCH):
                x, y = on_device[0][start:start + EVAL_BATCH], on_device[1][start:start + EVAL_BATCH]
                nn.functional.binary_cross_entropy_with_logits(net(x), y).item()

    hand_resident_rate = rate(hand_resident, 1, warmup=1, device=device, repeats=3) * len(dataset)

    labels = dataset.tensors[1]
    bundle = DataBundle("multilabel", dataset, dataset, dataset,
                        info={"num_labels": 4, "label_names": list("abcd"), "train_labels": labels,
                              "prevalence": labels.mean(0).tolist()})
    ctx = DeviceContext(device, device.type)
    r = {"a_eval_fp32": hand_rate, "a_eval_fp32_resident": hand_resident_rate}
    ref = reference[:EVAL_BATCH]
    for precision, channels_last, key in (("bf16", True, "c_eval_bf16_cl"), ("32", False, "c_eval_fp32")):
        trainer = TrainerConfig(batch_size=EVAL_BATCH, eval_batch_size=EVAL_BATCH, precision=precision,
                                num_workers=4, data_on_device=True)
        family = build_family(bundle, {"_target_": "runner.models.torchvision_models.build", "name": "densenet121"},
                              {"_target_": "runner.losses.multilabel.FocalLoss"})
        family.model.load_state_dict(net.state_dict())
        family.to(device)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        family.model.to(memory_format=memory_format)
        evaluate(family, bundle, "test", ctx, trainer)  # warm-up
        sync(device)
        start = time.perf_counter()
        repeats = 3
        for _ in range(repeats):
            evaluate(family, bundle, "test", ctx, trainer)
        sync(device)
        r[key] = repeats * len(dataset) / (time.perf_counter() - start)
        family.raw_model.eval()  # the predictions evaluate() made: eval-mode BatchNorm
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = family.raw_model(dataset.tensors[0][:EVAL_BATCH].to(device).contiguous(
                memory_format=memory_format)).float().cpu()
        r[f"{key}_logits_rel_err"] = float((logits - ref).norm() / ref.norm())
        r[f"{key}_same_decisions"] = float(((logits > 0) == (ref > 0)).float().mean())
    return r


def print_evaluation(r: dict) -> None:
    print(table([("(a) eval fp32 .item(), DataLoader", r["a_eval_fp32"], "img/s"),
                 ("(a) eval fp32 .item(), data on GPU", r["a_eval_fp32_resident"], "img/s"),
                 ("(c) runner eval fp32, data on GPU", r["c_eval_fp32"], "img/s"),
                 ("(c) runner eval bf16+CL, data on GPU", r["c_eval_bf16_cl"], "img/s")], r["a_eval_fp32"]))
    for key in ("c_eval_fp32", "c_eval_bf16_cl"):
        print(f"{key} logits vs (a): relative error {r[f'{key}_logits_rel_err']:.2e}, "
              f"same 0.5-threshold decisions {r[f'{key}_same_decisions']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=None)
    parser.add_argument("--eval-only", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    ceilings = device_ceilings(device)
    dataset = data()
    r = {"ceilings": ceilings}
    if args.eval_only:
        _, trained = hand_loop(dataset, device, 30)
        r.update(evaluation(dataset, device, trained))
        print(json.dumps(r, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(r, f, indent=2)
        print_evaluation(r)
        return
    r["a_hand_fp32"], trained = hand_loop(dataset, device, args.steps)
    print(f"(a) hand loop fp32: {r['a_hand_fp32']:,.0f} img/s", flush=True)
    r["b_lightning_bf16"] = lightning(dataset, device, args.steps, "bf16-mixed")
    r["b_lightning_32"] = lightning(dataset, device, args.steps, "32-true")
    print(f"(b) Lightning bf16-mixed {r['b_lightning_bf16']}, 32-true {r['b_lightning_32']} img/s", flush=True)
    r["c_runner_fp32"] = runner_train(args.steps)
    r["c_runner_bf16_cl"] = runner_train(args.steps, "trainer.precision=bf16", "trainer.channels_last=true",
                                         "trainer.data_on_device=true")
    r["c_runner_bf16_cl_compile"] = runner_train(args.steps, "trainer.precision=bf16", "trainer.channels_last=true",
                                                 "trainer.data_on_device=true", "trainer.compile=true")
    r["c_runner_bf16_cl_graph"] = runner_train(args.steps, "trainer.precision=bf16", "trainer.channels_last=true",
                                               "trainer.data_on_device=true", "trainer.cuda_graph=true")
    r["c_runner_fp32_graph"] = runner_train(args.steps, "trainer.data_on_device=true", "trainer.cuda_graph=true")
    r["c_runner_bf16_cl_graph_dataloader"] = runner_train(args.steps, "trainer.precision=bf16",
                                                          "trainer.channels_last=true", "trainer.cuda_graph=true",
                                                          "trainer.num_workers=4")
    r.update(evaluation(dataset, device, trained))
    print(json.dumps(r, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=2)
    rows = [("(a) hand loop fp32", r["a_hand_fp32"], "img/s")]
    for key, name in (("b_lightning_bf16", "(b) Lightning bf16-mixed"), ("b_lightning_32", "(b) Lightning 32-true")):
        if r[key]:
            rows.append((name, r[key], "img/s"))
    rows += [("(c) runner fp32", r["c_runner_fp32"], "img/s"), ("(c) runner bf16+CL", r["c_runner_bf16_cl"], "img/s"),
             ("(c) runner bf16+CL+compile", r["c_runner_bf16_cl_compile"], "img/s"),
             ("(c) runner bf16+CL+cuda_graph", r["c_runner_bf16_cl_graph"], "img/s"),
             ("(c) runner fp32+cuda_graph", r["c_runner_fp32_graph"], "img/s"),
             ("(c) runner bf16+CL+cuda_graph, 4-worker loader", r["c_runner_bf16_cl_graph_dataloader"], "img/s")]
    print(f"runner's best training vs Lightning bf16-mixed: "
          f"{max(r[k] for k in r if k.startswith('c_runner')) / r['b_lightning_bf16']:.2f}x"
          if r["b_lightning_bf16"] else "")
    print(f"DenseNet121 224px batch {BATCH} training on {ceilings.get('gpu')}")
    print(table(rows, r["a_hand_fp32"]))
    print_evaluation(r)


if __name__ == "__main__":
    main()
