"""The one training and evaluation loop, for every family and every device strategy.

Read top to bottom: ``fit`` runs epochs of micro-batches; every ``accumulate_grad_batches``
micro-batches (or at the end of the epoch) it takes one optimizer step whose gradient is the
sum of per-unit losses over the window divided by the number of units in the window — exact
accumulation, including a shorter last window and a smaller last batch. Losses stay on the
device and are read only at logging points (no per-step host sync on the GPU path).
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from runner.engine import checkpoint as ckpt
from runner.engine import data as loaders
from runner.engine.devices import DeviceContext
from runner.engine.family import DataBundle, Family
from runner.engine.graphs import GraphedStep, graph_unsupported, step_slice
from runner.engine.progress import ProgressDisplay
from runner.engine.results import RunResults
from runner.errors import UserError
from runner.optim import build_optimizer, build_schedule, has_batchnorm

log = logging.getLogger("runner")

# tf32: fp32 everywhere except matrix products, which use TF32 tensor cores (run.py sets that).
AUTOCAST_DTYPES = {"32": None, "tf32": None, "bf16": torch.bfloat16, "16": torch.float16}


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived: the loop finished its step and wrote a checkpoint."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class LoopState:
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (resume point)
    step: int = 0  # optimizer steps taken
    samples_seen: int = 0  # units (samples or tokens) trained on, all processes
    skipped_steps: int = 0  # non-finite steps skipped (trainer.skip_nonfinite)
    best: float | None = None  # best value of trainer.monitor so far


class SignalFlag:
    """First SIGINT/SIGTERM asks the loop to stop after the current step; a second SIGINT
    exits at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "SignalFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some launchers): no handler
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def autocast(ctx: DeviceContext, precision: str, cache_enabled: bool = True):
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device_type=ctx.device.type, dtype=dtype, enabled=dtype is not None,
                          cache_enabled=cache_enabled)


@contextlib.contextmanager
def full_fp32_matmul():
    """Evaluation's matrix products run in full fp32 even when training used TF32
    (trainer.precision=tf32): the reported metrics are those of the trained weights, not of a
    faster approximation. (Convolutions follow PyTorch's own cuDNN default in every mode.)"""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def evaluate(family: Family, bundle: DataBundle, split: str, cfg: DictConfig, ctx: DeviceContext) -> tuple[dict[str, float], int]:
    """Metrics of one split, every sample seen once across processes; (metrics, samples)."""
    dataset = getattr(bundle, split)
    batch_size = cfg.trainer.eval_batch_size or cfg.trainer.batch_size
    if cfg.trainer.data_on_device and hasattr(dataset, "tensors") and not bundle.prebatched:
        loader = loaders.resident(dataset, ctx.device).eval_batches(batch_size=batch_size, rank=ctx.rank,
                                                                    world=ctx.world_size)
    else:
        loader = loaders.eval_loader(dataset, batch_size=batch_size, rank=ctx.rank, world=ctx.world_size,
                                     prebatched=bundle.prebatched, num_workers=cfg.trainer.num_workers,
                                     pin=ctx.device.type == "cuda")
    move = loaders.batch_mover(dataset, ctx.to_device, ctx.device)
    evaluator = family.evaluator(split)
    was_training = family.model.training
    family.model.eval()
    with torch.no_grad(), autocast(ctx, str(cfg.trainer.precision)), full_fp32_matmul():
        for batch in loader:
            evaluator.update(move(batch))
    family.model.train(was_training)
    sums = {k: ctx.all_reduce_sum(v.to(ctx.device)).cpu() for k, v in sorted(evaluator.sums.items())}
    rows = {k: ctx.gather_rows(torch.cat(v).to(ctx.device)).cpu() for k, v in sorted(evaluator.rows.items())}
    count = int(ctx.all_reduce_sum(torch.tensor(evaluator.count, device=ctx.device)).item())
    raw = evaluator.compute(sums, rows)
    unprefixed = getattr(evaluator, "unprefixed", set())
    metrics = {(k if k in unprefixed else f"{split}/{k}"): float(v) for k, v in raw.items()}
    return metrics, count


class Trainer:
    """Holds what the loop needs between steps; ``fit`` is the loop."""

    def __init__(self, family: Family, bundle: DataBundle, cfg: DictConfig, ctx: DeviceContext,
                 results: RunResults, run_dir: Path | None):
        self.family, self.bundle, self.cfg, self.ctx = family, bundle, cfg, ctx
        self.results, self.run_dir = results, run_dir
        t = cfg.trainer
        self.precision = str(t.precision)
        self.model = family.model  # possibly wrapped (DDP); family.raw_model is the bare one
        self.params = [p for p in family.raw_model.parameters() if p.requires_grad]
        if t.cuda_graph:
            reason = graph_unsupported(ctx.device, ctx.world_size, t.accumulate_grad_batches, t.skip_nonfinite)
            if reason is None and self.precision == "16":
                reason = "trainer.cuda_graph does not support trainer.precision=16 (its grad scaler reads on the host); use bf16"
            if reason:
                raise UserError(reason)
        self.optimizer = build_optimizer(self.params, cfg.optim, ctx.device, capturable=t.cuda_graph)
        self.device_batches = loaders.resident(bundle.train, ctx.device) if t.data_on_device else None
        # Resident batches are cut on the device already: nothing to move on the per-step path.
        self.move_batch = ((lambda batch: batch) if self.device_batches is not None
                           else loaders.batch_mover(bundle.train, ctx.to_device, ctx.device))
        self.batches_per_epoch = loaders.train_batches_per_epoch(bundle.train, t.batch_size, ctx.world_size, bundle.prebatched)
        if t.limit_train_batches > 0:
            self.batches_per_epoch = min(self.batches_per_epoch, t.limit_train_batches)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / t.accumulate_grad_batches)
        self.max_epochs = int(t.max_epochs)
        self.total_steps = self.steps_per_epoch * self.max_epochs
        if t.max_steps > 0:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.schedule = build_schedule(self.optimizer, cfg.schedule, self.steps_per_epoch, self.total_steps)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.precision == "16")
        self.state = LoopState()
        self.monitor_sign = 1.0 if str(getattr(t.monitor_mode, "value", t.monitor_mode)) == "min" else -1.0
        self.final_metrics: dict[str, float] = {}
        self.eval_samples: dict[str, int] = {}
        self.train_seconds = 0.0  # training only: evaluation and checkpoint time is left out
        self.paused_s = 0.0  # evaluation and checkpoint time so far
        self.pending_units = torch.zeros((), device=ctx.device, dtype=torch.float64)
        # Device-side loss sum since the last log, updated inside the captured step too; a NaN
        # or Inf stays in it until check_finite reads it.
        self.running_loss = torch.zeros((), device=ctx.device, dtype=torch.float64)
        self.graphed = GraphedStep(self.graph_body) if t.cuda_graph else None
        self.steps_per_graph = int(t.steps_per_graph)
        self.graphed_steps = GraphedStep(self.graph_bodies) if self.steps_per_graph > 1 else None
        self.graph_units = 0

    # --- checkpoints -------------------------------------------------------------------------
    def checkpoint_payload(self) -> dict[str, Any]:
        return {
            "model": self.family.raw_model.state_dict(),
            "model_target": str(self.cfg.model.get("_target_", "")),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loop": asdict(self.state),
            "rng": ckpt.rng_state(),
            "family": self.family.state_dict() if hasattr(self.family, "state_dict") else {},
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
        }

    def save(self, name: str) -> None:
        started = time.time()
        self.sync_counts()
        if self.ctx.is_main and self.run_dir is not None:
            ckpt.save_checkpoint(self.run_dir / "checkpoints" / f"{name}.pt", self.checkpoint_payload())
        self.ctx.barrier()
        self.paused_s += time.time() - started

    def restore(self, payload: dict[str, Any], path: Path) -> None:
        ckpt.load_model_weights(self.family.raw_model, payload, path)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.schedule.load_state_dict(payload["schedule"])
        self.scaler.load_state_dict(payload["scaler"])
        self.state = LoopState(**payload["loop"])
        ckpt.set_rng_state(payload["rng"])
        if payload.get("family") and hasattr(self.family, "load_state_dict"):
            self.family.load_state_dict(payload["family"])

    # --- evaluation during training ------------------------------------------------------------
    def validate(self, progress: ProgressDisplay) -> None:
        if self.bundle.val is None:
            return
        started = time.time()
        metrics, count = evaluate(self.family, self.bundle, "val", self.cfg, self.ctx)
        self.eval_samples["val"] = count
        self.final_metrics.update(metrics)
        self.results.log({"epoch": self.state.epoch, "step": self.state.step, "split": "val", **metrics})
        if self.ctx.is_main:
            self.family.after_evaluation("val", metrics, self.run_dir)
        progress.message(f"val @ step {self.state.step}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.count("/") == 1)[:300])
        self.paused_s += time.time() - started
        monitored = metrics.get(self.cfg.trainer.monitor)
        if monitored is not None and math.isfinite(monitored):
            if self.state.best is None or self.monitor_sign * monitored < self.monitor_sign * self.state.best:
                self.state.best = monitored
                self.save("best")

    # --- the loop ----------------------------------------------------------------------------
    def fit(self, stop: SignalFlag) -> None:
        t, ctx, family = self.cfg.trainer, self.ctx, self.family
        accumulate = t.accumulate_grad_batches
        # Plain ints: a DictConfig read costs microseconds, a lot next to a captured step.
        log_every, val_every, ckpt_every = int(t.log_every_n_steps), int(t.val_every_n_steps), int(t.ckpt_every_n_steps)
        if accumulate > 1 and has_batchnorm(family.raw_model):
            log.warning("the model has BatchNorm: with accumulate_grad_batches=%d its statistics are "
                        "computed per micro-batch of %d, not per optimizer step", accumulate, t.batch_size)
        progress = ProgressDisplay(self.total_steps, family.unit, t.progress, enabled=ctx.is_main)
        running_units = 0
        first_bad_step = torch.full((), -1, device=ctx.device, dtype=torch.long)
        last_log_time, last_log_units, last_paused = time.time(), self.state.samples_seen, self.paused_s
        started, paused_at_start = time.time(), self.paused_s
        try:
            while self.state.epoch < self.max_epochs and not self.done():
                epoch = self.state.epoch
                family.on_train_epoch_start(epoch)
                batches, previous = iter(self.epoch_batches(epoch)), None
                window_loss = torch.zeros((), device=ctx.device, dtype=torch.float64)
                window_units = 0
                while self.state.batch_in_epoch < self.batches_per_epoch:
                    i = self.state.batch_in_epoch
                    steps_now = (i + 1) % accumulate == 0 or i + 1 == self.batches_per_epoch
                    n = self.steps_in_one_launch(batches)  # > 1: that many captured steps at once
                    batch = batches.take(n) if n > 1 else next(batches, None)
                    # Shards differ by at most one sample, so a process may run out one batch
                    # early: it repeats its last batch with weight 0, taking part in DDP's
                    # gradient all-reduce without adding anything to it.
                    weight = 1 if batch is not None else 0
                    batch = previous if batch is None else self.move_batch(batch)
                    previous = batch
                    self.state.batch_in_epoch += n
                    graphed = self.graphed_steps if n > 1 else self.graphed
                    if graphed is not None and graphed.accepts(batch):
                        graphed(batch)  # forward, backward and optimizer step(s), on the device
                        for _ in range(n):
                            running_units += self.graph_units
                            self.finish_step(self.graph_units)
                    else:
                        with ctx.no_sync(self.model, skip=not steps_now), autocast(ctx, self.precision):
                            loss_sum, units = family.train_loss(batch)
                            if weight == 0:
                                loss_sum, units = loss_sum * 0.0, 0
                            self.scaler.scale(loss_sum.float()).backward()
                        window_loss += loss_sum.detach().double()
                        window_units += units
                        # Let this step's autograd graph go now: a CUDA-graph capture later in the
                        # run must not find its gradient accumulators alive on another stream.
                        del loss_sum
                        if not steps_now:
                            continue
                        if not self.optimizer_step(window_loss, window_units, first_bad_step):
                            self.state.skipped_steps += 1
                        self.running_loss += window_loss
                        running_units += window_units
                        self.finish_step(window_units)
                        window_loss = torch.zeros_like(window_loss)
                        window_units = 0
                    if self.passed_multiple(log_every, n) or self.done():
                        self.check_finite(first_bad_step)
                        self.sync_counts()
                        loss = float(ctx.all_reduce_sum(self.running_loss).item()) / max(
                            1, int(ctx.all_reduce_sum(torch.tensor(running_units, device=ctx.device)).item()))
                        now = time.time()
                        busy = now - last_log_time - (self.paused_s - last_paused)  # training time only
                        rate = (self.state.samples_seen - last_log_units) / max(busy, 1e-9)
                        last_log_time, last_log_units, last_paused = now, self.state.samples_seen, self.paused_s
                        progress.update(self.state.step, epoch, loss, rate)
                        self.results.log({"epoch": epoch, "step": self.state.step, "split": "train", "loss": loss,
                                          "lr": float(self.optimizer.param_groups[0]["lr"]), f"{family.unit}_per_s": rate})
                        self.running_loss.zero_()  # in place: the captured step adds into this tensor
                        running_units = 0
                    if self.passed_multiple(val_every, n):
                        self.validate(progress)
                    if self.passed_multiple(ckpt_every, n):
                        self.save("last")
                    if stop.signum is not None:
                        self.save("last")
                        raise Interrupted(stop.signum)
                    if self.done():
                        break
                self.check_finite(first_bad_step)
                if self.state.batch_in_epoch >= self.batches_per_epoch:
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
                if val_every == 0:
                    self.validate(progress)
                self.save("last")
                if stop.signum is not None:
                    raise Interrupted(stop.signum)
        finally:
            self.train_seconds += time.time() - started - (self.paused_s - paused_at_start)
            progress.close()

    def epoch_batches(self, epoch: int):
        t, ctx = self.cfg.trainer, self.ctx
        common = dict(batch_size=t.batch_size, epoch=epoch, seed=t.seed, rank=ctx.rank, world=ctx.world_size,
                      weights=self.bundle.train_weights, skip_batches=self.state.batch_in_epoch)
        if self.device_batches is not None:
            return self.device_batches.epoch(**common)
        return loaders.train_loader(self.bundle.train, prebatched=self.bundle.prebatched, num_workers=t.num_workers,
                                    pin=ctx.device.type == "cuda", **common)

    def graph_body(self, batch: Any) -> None:
        """One whole optimizer step, written to be captured: no host reads, static shapes, and
        gradients zeroed in place after the step (their memory belongs to the graph, and an eager
        step for an odd-sized batch must find them zero)."""
        t = self.cfg.trainer
        with autocast(self.ctx, self.precision, cache_enabled=False):
            loss_sum, units = self.family.train_loss(batch)
        loss_sum.float().backward()
        self.graph_units = int(units)
        # The eager step's arithmetic, in its order (sum, backward, divide): the captured step
        # computes the same weights, not merely close ones.
        torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], 1.0 / self.graph_units)
        if t.gradient_clip_val > 0:
            torch.nn.utils.clip_grad_norm_(self.params, t.gradient_clip_val, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        self.running_loss.add_(loss_sum.detach())  # a NaN or Inf stays in it until check_finite reads it

    def graph_bodies(self, batches: Any) -> None:
        """trainer.steps_per_graph optimizer steps, one per stacked batch, captured as one graph."""
        for s in range(self.steps_per_graph):
            self.graph_body(step_slice(batches, s))

    def steps_in_one_launch(self, batches: Any) -> int:
        """trainer.steps_per_graph where that many steps fit before the end of the epoch and of
        the run and all use one lr (it is set between launches); otherwise 1."""
        n = self.steps_per_graph  # > 1 only with data_on_device (run.validate): batches is a ResidentEpoch
        if n == 1:
            return 1
        left = min(batches.full_batches_left(), self.batches_per_epoch - self.state.batch_in_epoch,
                   self.total_steps - self.state.step)
        return n if left >= n and self.schedule.constant_for(n) else 1

    def passed_multiple(self, every: int, steps: int) -> bool:
        """Whether the last ``steps`` optimizer steps reached a multiple of ``every`` (0: never)."""
        return every > 0 and self.state.step // every != (self.state.step - steps) // every

    def finish_step(self, units: int) -> None:
        self.schedule.step()  # also after a skipped step: the lr stays a function of the step count
        self.state.step += 1
        if not self.ctx.distributed:
            self.state.samples_seen += int(units)

    def done(self) -> bool:
        return self.state.step >= self.total_steps

    def optimizer_step(self, window_loss: torch.Tensor, window_units: int, first_bad_step: torch.Tensor) -> bool:
        """Divide the summed gradients by the window's units over all processes, clip, step."""
        t, ctx = self.cfg.trainer, self.ctx
        self.scaler.unscale_(self.optimizer)
        if ctx.distributed:
            # DDP averaged the gradients over processes: multiply by W/units to get sum/units.
            units = ctx.all_reduce_sum(torch.tensor(float(window_units), device=ctx.device, dtype=torch.float64))
            self.pending_units += units
            scale: torch.Tensor | float = (ctx.world_size / units).float()
        else:
            scale = 1.0 / float(window_units)
        grads = [p.grad for p in self.params if p.grad is not None]
        torch._foreach_mul_(grads, scale)  # one fused launch, not one per parameter
        if t.gradient_clip_val > 0:
            torch.nn.utils.clip_grad_norm_(self.params, t.gradient_clip_val)
        bad = ~torch.isfinite(window_loss)
        first_bad_step.copy_(torch.where(bad & (first_bad_step < 0), self.state.step, first_bad_step))
        stepped = not (t.skip_nonfinite and bool(bad))  # opt-in: one host sync per step to skip
        if stepped:
            self.scaler.step(self.optimizer)
        self.scaler.update()  # a no-op unless precision=16
        # Under a captured step the gradients' memory belongs to the graph: zero it in place.
        self.optimizer.zero_grad(set_to_none=self.graphed is None)
        return stepped

    def sync_counts(self) -> None:
        """Fold the device-side unit count (DDP) into the loop state; called at logging points."""
        if self.ctx.distributed:
            self.state.samples_seen += int(self.pending_units.item())
            self.pending_units.zero_()

    def check_finite(self, first_bad_step: torch.Tensor) -> None:
        if self.cfg.trainer.skip_nonfinite:
            return
        bad = int(first_bad_step.item())
        if bad < 0 and not bool(torch.isfinite(self.running_loss)):
            bad = self.state.step  # inside a captured step: known to have happened by this step
        if bad >= 0:
            raise NonFiniteLoss(
                f"non-finite training loss (NaN or Inf) in family '{self.bundle.family}' at optimizer step {bad}; "
                "lower optim.lr, use trainer.precision=32, or set trainer.skip_nonfinite=true to skip such steps")
