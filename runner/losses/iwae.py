"""Importance-weighted bounds on log p(x) and their gradient estimators (VAE, IWAE, DReG).

The bound functions take log-weights ``log_w`` [k, B] (log p(x, z_i) - log q(z_i | x) for k
samples per data point) and return one bound per data point [B]. They know nothing about the
model, so they are tested on a linear-Gaussian model whose log p(x) is analytic.

* ``elbo_bound``: the k-sample average of log w (the paper's VAE column with k samples).
* ``iwae_bound``: log (1/k) sum_i w_i, by logsumexp — no exp of large numbers, no log(x + eps).
  Its autograd gradient is sum_i w~_i grad log w_i with w~ = softmax(log w) — the practitioners'
  formula, which is right only when w~ is held constant (stop-gradient); differentiating
  through w~ as well gives a different, wrong gradient (tests/test_density_bounds.py).
* ``dreg_surrogate`` (Tucker, Lawson, Gu & Maddison 2018): value = the IWAE bound; gradient =
  the IWAE gradient for the decoder and the doubly reparameterised one for the encoder,
  sum_i w~_i^2 (d log w_i / d z_i)(d z_i / d phi), with q's parameters stopped inside log w.

The config classes below (runner/conf/loss/{elbo,iwae,dreg}.yaml) hold ``k`` and the evaluation
settings of the density family: ``eval_k`` importance samples for the test NLL (5000, the
paper's), ``val_eval_k`` for validation (0 = report only the bound on val, so that validation
each epoch stays cheap), and ``eval_budget_mb``, the memory for one chunk of samples.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from runner.errors import UserError


def elbo_bound(log_w: Tensor) -> Tensor:
    return log_w.mean(0)


def iwae_bound(log_w: Tensor) -> Tensor:
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


def dreg_surrogate(log_w: Tensor, latents: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    """Per data point: the IWAE bound's value with the DReG gradient.

    ``log_w`` must be computed with q's parameters stopped (``model(x, k, stop_q=True)``) and
    ``latents`` are the samples [k, B, d] through which the gradient of log w reaches the
    encoder. Scaling that gradient by w~_i (a tensor hook) turns the surrogate's w~_i into the
    w~_i^2 of DReG on the encoder path only; the decoder's gradient does not pass through z."""
    weights = torch.softmax(log_w.detach(), 0)
    for z in latents:
        if z.requires_grad:
            z.register_hook(lambda grad, w=weights.unsqueeze(-1): grad * w)
    surrogate = (weights * log_w).sum(0)
    return iwae_bound(log_w.detach()) + (surrogate - surrogate.detach())


class ImportanceBound:
    """A bound with k samples per data point; ``__call__`` gives per-sample losses (-bound)."""

    stop_q = False  # whether the model must evaluate log q with q's parameters stopped

    def __init__(self, k: int = 1, eval_k: int = 5000, val_eval_k: int = 0, eval_budget_mb: float = 256.0):
        if k <= 0:
            raise UserError(f"loss.k={k}: the number of importance samples must be a positive integer")
        if eval_k <= 0:
            raise UserError(f"loss.eval_k={eval_k}: the number of samples of the test NLL must be positive")
        if val_eval_k < 0:
            raise UserError(f"loss.val_eval_k={val_eval_k}: must be >= 0 (0 = only the bound on val)")
        if eval_budget_mb <= 0:
            raise UserError(f"loss.eval_budget_mb={eval_budget_mb}: must be positive")
        self.k, self.eval_k, self.val_eval_k, self.eval_budget_mb = k, eval_k, val_eval_k, eval_budget_mb

    def bound(self, log_w: Tensor) -> Tensor:
        return iwae_bound(log_w)

    def surrogate(self, out: dict) -> Tensor:
        return self.bound(out["log_w"])

    def __call__(self, out: dict) -> Tensor:
        """Per-data-point loss [B] (negative bound) from the model's forward output."""
        return -self.surrogate(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k})"


class ELBO(ImportanceBound):
    """The VAE objective averaged over k samples."""

    def bound(self, log_w: Tensor) -> Tensor:
        return elbo_bound(log_w)


class IWAE(ImportanceBound):
    """The k-sample importance-weighted bound with its plain reparameterised gradient."""


class DReG(ImportanceBound):
    """The IWAE bound trained with doubly reparameterised encoder gradients."""

    stop_q = True

    def surrogate(self, out: dict) -> Tensor:
        return dreg_surrogate(out["log_w"], out["latents"])
