"""mode=predict: ``predictions.csv``, one row per sample in dataset order, exact under any number
of processes (each process predicts a contiguous shard; rows are gathered in rank order, without
padding). The family says what a row holds (``Family.predict``: tensors, so that they gather),
and optionally how the gathered columns read in the file (``prediction_table``: class names for
indices) and what they score where the data have labels (``prediction_metric``: accuracy, mAP).
The dataset may name its samples (``sample_ids()``: file paths), otherwise the row number
identifies them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from runner.config import TrainerConfig
from runner.engine import data as loaders
from runner.engine.devices import DeviceContext
from runner.engine.family import DataBundle, Family
from runner.engine.precision import autocast, full_fp32_matmul
from runner.errors import UserError
from runner.runs.files import atomic_write_text


def prediction_split(bundle: DataBundle) -> tuple[str, object]:
    """The data to predict: the bundle's ``predict`` split (unlabelled data) or its test split."""
    for split in ("predict", "test"):
        dataset = getattr(bundle, split, None)
        if dataset is not None:
            return split, dataset
    raise UserError("mode=predict needs data: this dataset has neither a predict nor a test split")


def predict(family: Family, bundle: DataBundle, ctx: DeviceContext, trainer: TrainerConfig,
            run_dir: Path | None) -> dict[str, Any]:
    """Write ``<run_dir>/predictions.csv`` (rank 0). Returns what the run's end says of it:
    ``path`` (None off rank 0), ``rows`` and ``metric`` (``{"accuracy": 0.94}`` over the labels
    where the data have them; empty otherwise)."""
    if not hasattr(family, "predict"):
        raise UserError(f"the {bundle.family} family does not write predictions")
    split, dataset = prediction_split(bundle)
    loader = loaders.eval_loader(dataset, batch_size=trainer.eval_batch_size or trainer.batch_size, rank=ctx.rank,
                                 world=ctx.world_size, prebatched=bundle.prebatched, num_workers=trainer.num_workers,
                                 pin=ctx.device.type == "cuda")
    move = loaders.batch_mover(dataset, ctx.to_device, ctx.device)
    columns: dict[str, list[torch.Tensor]] = {}
    family.model.eval()
    with torch.no_grad(), autocast(ctx.device, trainer.precision), full_fp32_matmul():
        for batch in loader:
            for name, values in family.predict(move(batch)).items():
                columns.setdefault(name, []).append(values.detach().float().reshape(len(values), -1))
    gathered = {name: ctx.gather_rows(torch.cat(parts).to(ctx.device)).cpu() for name, parts in columns.items()}
    rows = len(next(iter(gathered.values()))) if gathered else 0
    metric = family.prediction_metric(gathered) if hasattr(family, "prediction_metric") else {}
    path = Path(run_dir) / "predictions.csv" if ctx.is_main and run_dir is not None else None
    if path is not None:
        ids = dataset.sample_ids() if hasattr(dataset, "sample_ids") else list(range(rows))
        named = family.prediction_table(gathered) if hasattr(family, "prediction_table") else gathered
        table = pd.DataFrame({"sample": ids[:rows]})
        for name, values in named.items():
            table[name] = column(values)
        atomic_write_text(path, table.to_csv(index=False, float_format="%.6g"))
    return {"path": str(path) if path is not None else None, "rows": rows, "metric": metric}


def column(values: Any) -> Any:
    """A CSV column: a tensor of one value per row flattened, of several values a list per row."""
    if not isinstance(values, torch.Tensor):
        return values
    values = values.reshape(len(values), -1)
    return values[:, 0].numpy() if values.shape[1] == 1 else list(values.numpy())
