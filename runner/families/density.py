"""The latent-variable density family: VAE / IWAE / DReG on binarised 28x28 images.

train_loss: binarise the batch with ``torch.bernoulli`` from the global RNG (dynamic
binarisation, as in Burda et al.; identity on items that are already 0/1), ONE model call that
draws k samples per data point from a single encoder pass, and the sum of the per-sample
negative bounds. Evaluation: runner/metrics/density.py. After the test evaluation a grid of
samples and reconstructions goes to ``run_dir/plots/samples.png`` when matplotlib is installed.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from typing import Any

from torch import Tensor

from runner.config.build import build as build_node, plain
from runner.report import plots
from runner.engine.family import DataBundle, StepInParts
from runner.errors import UserError
from runner.config.compat import Accepts
from runner.families.first_batch import check_first_batch, check_fits
from runner.losses.iwae import DReG, ImportanceBound
from runner.metrics.density import DensityEvaluator
from runner.models.vae import VAE

ACCEPTS = Accepts(datasets=("runner.data.binarized.",), models=("runner.models.vae.",), losses=("runner.losses.iwae.",))

log = logging.getLogger(__name__)
PLOT_SEED = 0
GRID = 8  # the plot shows GRID x GRID samples and GRID x GRID test images beside their reconstructions


class DensityFamily(StepInParts):
    def __init__(self, model: VAE, loss: ImportanceBound, bundle: DataBundle):
        self.model, self.loss, self.bundle = model, loss, bundle
        if isinstance(loss, DReG):
            # Seen: the model compiled alone hands the hook no gradient (CPU, torch 2.14); the model
            # and loss compiled as one failed inductor on an H200 (torch 2.11, BackendCompilerFailed).
            self.compile_blocker = "loss=dreg's gradient hook does not survive torch.compile"
        self.dim = int(bundle.info["dim"])
        self.image_shape = tuple(bundle.info.get("image_shape", (28, 28)))

    # A training step in three parts (runner/engine/family.py): the random draws, the model, the loss.
    def train_inputs(self, batch: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Dynamic binarisation and the k latent draws per data point, from ``generator``."""
        x = torch.bernoulli(batch.float(), generator=self.generator)
        return x, self.raw_model.noise(self.loss.k, x.shape[0], self.generator)

    def forward(self, model: VAE, inputs: tuple[Tensor, list[Tensor]]) -> dict:
        x, noise = inputs
        # k from the draws, not from this job's loss: a fused group runs every job at its largest k.
        return model(x, noise[0].shape[0], self.loss.stop_q, noise=noise)

    def loss_sum(self, outputs: dict, inputs: tuple[Tensor, list[Tensor]]) -> Tensor:
        if outputs["log_w"].shape[0] != self.loss.k:  # fused with larger k: the rows past ours are padding
            outputs = {"log_w": outputs["log_w"][: self.loss.k],
                       "latents": tuple(z[: self.loss.k] for z in outputs["latents"])}
        return self.loss(outputs).sum()

    def units(self, inputs: tuple[Tensor, list[Tensor]]) -> int:
        return inputs[0].shape[0]

    def check_output(self, batch: Tensor) -> None:
        inputs = self.train_inputs(batch)
        outputs = self.forward(self.raw_model, inputs)
        log_w = outputs.get("log_w") if isinstance(outputs, dict) else outputs
        check_fits(log_w, (self.loss.k, inputs[0].shape[0]), f"log_w of loss.k={self.loss.k} samples per image",
                   "the model's forward must return {'log_w': [k, batch], ...} as runner.models.vae.VAE does")

    def predict(self, batch: Tensor) -> dict[str, Tensor]:
        """mode=predict: each sample's ELBO and its k-sample importance bound (k = loss.k), in nats."""
        log_w = self.raw_model(batch.float(), self.loss.k)["log_w"].float()
        k = log_w.shape[0]
        return {"elbo": log_w.mean(0), f"bound_k{k}": torch.logsumexp(log_w, 0) - math.log(k)}

    def evaluator(self, split: str) -> DensityEvaluator:
        nll_k = self.loss.val_eval_k if split == "val" else self.loss.eval_k
        return DensityEvaluator(self.raw_model, self.loss, nll_k, self.dim)

    def after_evaluation(self, split: str, metrics: dict[str, float], run_dir: Path | None) -> None:
        if split == "test" and run_dir is not None and self.bundle.test is not None:
            write_samples_plot(self.raw_model, self.bundle.test, self.image_shape, Path(run_dir) / "plots" / "samples.png")


def write_samples_plot(model: VAE, test_set, image_shape: tuple[int, int], path: Path) -> bool:
    """Prior samples (left) and test images over their reconstructions (right). False when
    matplotlib is absent."""
    Figure = plots.figure_class()
    if Figure is None:
        return False
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    h, w = image_shape
    n = GRID * GRID
    generator = torch.Generator(device=device).manual_seed(PLOT_SEED)
    samples = model.sample(n, generator=generator).cpu()
    half = n // 2
    originals = torch.zeros(half, h * w)
    shown = min(half, len(test_set))
    originals[:shown] = torch.stack([test_set[i].float() for i in range(shown)])
    reconstructions = model.reconstruct(originals.to(device)).cpu()
    model.train(was_training)
    # Rows of test images alternate with rows of their reconstructions.
    pairs = torch.stack([originals.reshape(-1, GRID, h * w), reconstructions.reshape(-1, GRID, h * w)], 1)
    fig = Figure(figsize=(10, 5))
    axes = fig.subplots(1, 2)
    for ax, images, title in ((axes[0], samples, "samples p(x|z), z ~ prior"),
                              (axes[1], pairs, "test images (odd rows) and reconstructions")):
        grid = images.reshape(GRID, GRID, h, w).permute(0, 2, 1, 3).reshape(GRID * h, GRID * w)
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    plots.save(fig, path)
    return True


# Jobs that differ in k fuse: each draws its own k samples, the group's step runs every job at the
# largest k (the draws zero-padded), and each job's loss reads only its own k rows of log w.
FUSION_PADDED = ("loss.k",)


def fusion_blocker(model: Any, loss: Any) -> str | None:
    """VAE and IWAE jobs fuse (runner/engine/fused.py); DReG rescales gradients by a hook inside
    the model, which a batched forward pass does not reach."""
    return "loss=dreg does not fuse" if str(plain(loss).get("_target_", "")).endswith("DReG") else None


def build(bundle: DataBundle, model: Any, loss: Any, seed: int = 0) -> DensityFamily:
    model = build_node(model, "model", x_dim=int(bundle.info["dim"]), train_mean=bundle.info.get("train_mean"))
    loss = build_node(loss, "loss")
    if not isinstance(model, VAE) or not isinstance(loss, ImportanceBound):
        raise UserError("the density family needs a VAE model (model=vae1|vae2) and an importance bound "
                        "(loss=elbo|iwae|dreg)")
    return check_first_batch(DensityFamily(model, loss, bundle), bundle)
