"""Evaluation of the density family: k=5000 test NLL, the training bound, active units.

* ``nll_k<K>``: -log (1/K) sum_i w_i with K importance samples (K = ``loss.eval_k`` on test,
  ``loss.val_eval_k`` on val, where 0 leaves it out). The K samples are drawn in chunks sized
  so that chunk x batch x 784 floats stay inside ``loss.eval_budget_mb``, and the chunks'
  logsumexps are combined by one more logsumexp — the same number as one pass over all K.
* ``bound`` / ``loss``: the training objective's bound at the training k, and its negative.
* ``active_units``: units whose posterior mean E_q[z|x] varies over the data with variance
  above 0.01 (Burda et al. 2016, section 5.2). The state is the float64 sums of the means and
  of their squares per unit, so the variance is exact however the data are split across
  processes. With several stochastic layers: ``active_units_<l>`` per layer and their total.

Randomness: each evaluator draws from its own generator with a fixed seed, so the estimates
do not consume the training RNG and repeat exactly for the same model and data.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from runner.engine.family import Evaluator

ACTIVE_THRESHOLD = 0.01
EVAL_SEED = 20160101
# Draws of z_{l-1} per data point to average a deeper layer's posterior mean over.
POSTERIOR_MEAN_SAMPLES = 100
# Floats alive per sample row and pixel while a chunk is evaluated (logits, softplus, product).
FLOATS_PER_PIXEL = 3


def chunk_for_budget(k: int, batch: int, dim: int, budget_mb: float) -> int:
    """Samples per chunk so that chunk x batch x dim floats (times the temporaries) fit the budget."""
    per_sample = batch * dim * FLOATS_PER_PIXEL * 4
    return max(1, min(k, int(budget_mb * 2 ** 20) // per_sample))


def log_mean_exp_chunked(log_w_of: Callable[[int], Tensor], k: int, chunk: int) -> Tensor:
    """log (1/k) sum_i exp(log w_i) over k samples drawn ``chunk`` at a time by ``log_w_of(n)``
    (which returns [n, B]); exact combination of the chunks by logsumexp."""
    partial = [torch.logsumexp(log_w_of(min(chunk, k - start)), 0) for start in range(0, k, chunk)]
    return torch.logsumexp(torch.stack(partial), 0) - math.log(k)


def active_unit_variances(mean_sum: Tensor, mean_sq_sum: Tensor, n: Tensor | float) -> Tensor:
    """Variance over the data of each unit's posterior mean, from the additive sums (float64)."""
    mean = mean_sum.double() / n
    return (mean_sq_sum.double() / n - mean ** 2).clamp_min(0)


def count_active(variances: Tensor, threshold: float = ACTIVE_THRESHOLD) -> int:
    return int((variances > threshold).sum())


class DensityEvaluator(Evaluator):
    """Additive state for one split; see the module docstring."""

    def __init__(self, model, loss, nll_k: int, dim: int):
        super().__init__()
        self.model, self.loss, self.nll_k, self.dim = model, loss, nll_k, dim
        self.generator: torch.Generator | None = None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(EVAL_SEED)
        return self.generator

    def update(self, batch: Tensor) -> None:
        # val/test items are binarised once at load (runner/data/binarized.py)
        x = batch.to(next(self.model.parameters()).dtype)
        n = x.shape[0]
        self.count += n
        g = self._generator(x.device)
        self.add_sum("n", torch.tensor(float(n), device=x.device))
        self.add_sum("bound", self.loss.bound(self.model(x, self.loss.k, generator=g)["log_w"]).sum())
        if self.nll_k:
            chunk = chunk_for_budget(self.nll_k, n, self.dim, self.loss.eval_budget_mb)
            log_px = log_mean_exp_chunked(lambda m: self.model(x, m, generator=g)["log_w"], self.nll_k, chunk)
            self.add_sum("log_px", log_px.sum())
        for layer, means in enumerate(self.model.posterior_means(x, POSTERIOR_MEAN_SAMPLES, generator=g), 1):
            means = means.double()
            self.add_sum(f"mean_{layer}", means.sum(0))
            self.add_sum(f"mean_sq_{layer}", (means ** 2).sum(0))

    def compute(self, sums: dict[str, Tensor], rows: dict[str, Tensor]) -> dict[str, float]:
        n = float(sums["n"])
        bound = float(sums["bound"]) / n
        metrics = {"loss": -bound, "bound": bound}
        if "log_px" in sums:
            metrics[f"nll_k{self.nll_k}"] = -float(sums["log_px"]) / n
        layers = sorted(int(key.split("_")[1]) for key in sums if key.startswith("mean_") and "sq" not in key)
        counts = [count_active(active_unit_variances(sums[f"mean_{l}"], sums[f"mean_sq_{l}"], n)) for l in layers]
        if len(counts) > 1:
            metrics.update({f"active_units_{l}": float(c) for l, c in zip(layers, counts)})
        metrics["active_units"] = float(sum(counts))
        return metrics
