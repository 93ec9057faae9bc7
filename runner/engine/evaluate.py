"""Evaluation of a split (during training, the test after it, mode=eval), exact under any number
of processes: each process evaluates a contiguous, disjoint shard, evaluators keep additive state, and the state is reduced (sums) or
gathered (per-sample rows, no padding) before metrics are computed."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from runner.config import TrainerConfig
from runner.engine import data as loaders
from runner.engine.devices import DeviceContext
from runner.engine.family import DataBundle, Family
from runner.engine.precision import autocast, full_fp32_matmul
from runner.engine.results import RunResults


def evaluate(family: Family, bundle: DataBundle, split: str, ctx: DeviceContext,
             trainer: TrainerConfig) -> tuple[dict[str, float], int]:
    """Metrics of one split, every sample seen once across processes; (metrics, samples)."""
    dataset = getattr(bundle, split)
    batch_size = trainer.eval_batch_size or trainer.batch_size
    limit = trainer.limit_val_batches if split == "val" else trainer.limit_test_batches
    items = loaders.eval_items(dataset, batch_size, bundle.prebatched, limit)
    if trainer.data_on_device and hasattr(dataset, "tensors") and not bundle.prebatched:
        loader = loaders.resident(dataset, ctx.device).eval_batches(batch_size=batch_size, rank=ctx.rank,
                                                                    world=ctx.world_size, items=items)
    else:
        loader = loaders.eval_loader(dataset, batch_size=batch_size, rank=ctx.rank, world=ctx.world_size,
                                     prebatched=bundle.prebatched, num_workers=trainer.num_workers,
                                     pin=ctx.device.type == "cuda", items=items)
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


def test_split(family: Family, bundle: DataBundle, ctx: DeviceContext, trainer: TrainerConfig,
               results: RunResults, run_dir: Path | None, where: dict[str, Any]) -> dict[str, float]:
    """Evaluate the test split (if any) and record it; ``where``: epoch, step and weights of the row."""
    if bundle.test is None:
        return {}
    metrics, count = evaluate(family, bundle, "test", ctx, trainer)
    results.summary["eval_samples"]["test"] = count
    results.log({**where, "split": "test", **metrics})
    if ctx.is_main:
        family.after_evaluation("test", metrics, run_dir)
    return metrics


def evaluate_checkpoint(family: Family, bundle: DataBundle, ctx: DeviceContext, trainer: TrainerConfig,
                        results: RunResults, run_dir: Path | None) -> None:
    """mode=eval: the loaded checkpoint's weights on val and test."""
    if bundle.val is not None:
        metrics, count = evaluate(family, bundle, "val", ctx, trainer)
        results.summary["metrics"].update(metrics)
        results.summary["eval_samples"]["val"] = count
        results.log({"epoch": None, "step": None, "split": "val", **metrics})
        if ctx.is_main:
            family.after_evaluation("val", metrics, run_dir)
    where = {"epoch": None, "step": None}
    results.summary["metrics"].update(test_split(family, bundle, ctx, trainer, results, run_dir, where))


def test_trained(trainer: Any, results: RunResults) -> None:
    """mode=train, after fitting: test the best weights by the monitored metric where validation
    chose some (else the last), and put the final metrics in the summary."""
    from runner.engine import checkpoint as ckpt

    if trainer.error is not None:  # the loop ended this run early: its own failure
        raise trainer.error
    family, bundle, ctx, run_dir = trainer.family, trainer.bundle, trainer.ctx, trainer.run_dir
    # Only rank 0 knows the run folder: it tells the others (identity under one process).
    best = run_dir / "checkpoints" / "best.pt" if run_dir is not None else None
    path = ctx.broadcast_object(str(best) if best is not None and best.is_file() else None)
    if path is not None:
        ckpt.load_model_weights(family.raw_model, ckpt.load_checkpoint(path, ctx.device), path)
    elif trainer.final_weights is not None:  # a fused job that closed before its group: its weights then
        family.raw_model.load_state_dict(trainer.final_weights)
    where = {"epoch": trainer.state.epoch, "step": trainer.state.step, "weights": "best" if path else "last"}
    test_metrics = test_split(family, bundle, ctx, trainer.settings, results, run_dir, where)
    if bundle.test is not None:
        results.summary["test_weights"] = where["weights"]
    results.summary["metrics"].update({**trainer.final_metrics, **test_metrics})
    results.summary["eval_samples"].update(trainer.eval_samples)
