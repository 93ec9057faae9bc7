"""Evaluation of one split, exact under any number of processes: each process evaluates a
contiguous, disjoint shard, evaluators keep additive state, and the state is reduced (sums) or
gathered (per-sample rows, no padding) before metrics are computed."""
from __future__ import annotations

import torch

from runner.config import TrainerConfig
from runner.engine import data as loaders
from runner.engine.devices import DeviceContext
from runner.engine.family import DataBundle, Family
from runner.engine.precision import autocast, full_fp32_matmul


def evaluate(family: Family, bundle: DataBundle, split: str, ctx: DeviceContext,
             trainer: TrainerConfig) -> tuple[dict[str, float], int]:
    """Metrics of one split, every sample seen once across processes; (metrics, samples)."""
    dataset = getattr(bundle, split)
    batch_size = trainer.eval_batch_size or trainer.batch_size
    if trainer.data_on_device and hasattr(dataset, "tensors") and not bundle.prebatched:
        loader = loaders.resident(dataset, ctx.device).eval_batches(batch_size=batch_size, rank=ctx.rank,
                                                                    world=ctx.world_size)
    else:
        loader = loaders.eval_loader(dataset, batch_size=batch_size, rank=ctx.rank, world=ctx.world_size,
                                     prebatched=bundle.prebatched, num_workers=trainer.num_workers,
                                     pin=ctx.device.type == "cuda")
    move = loaders.batch_mover(dataset, ctx.to_device, ctx.device)
    evaluator = family.evaluator(split)
    was_training = family.model.training
    family.model.eval()
    with torch.no_grad(), autocast(ctx.device, trainer.precision), full_fp32_matmul():
        for batch in loader:
            evaluator.update(move(batch))
    family.model.train(was_training)
    sums = {k: ctx.all_reduce_sum(v.to(ctx.device)).cpu() for k, v in sorted(evaluator.sums.items())}
    rows = {k: ctx.gather_rows(torch.cat(v).to(ctx.device)).cpu() for k, v in sorted(evaluator.rows.items())}
    count = int(ctx.all_reduce_sum(torch.tensor(evaluator.count, device=ctx.device)).item())
    # Every metric carries its split (test/active_units beside val/active_units).
    metrics = {f"{split}/{k}": float(v) for k, v in evaluator.compute(sums, rows).items()}
    return metrics, count
