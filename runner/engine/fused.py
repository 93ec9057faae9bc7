"""Fused jobs: runs of the same shapes trained as one batched model in one process.

A small model (IWAE at batch 20) leaves a GPU idle: its step is a few hundred tiny kernels, and
a second job on the same GPU only time-slices it. Jobs that share their architecture and tensor
shapes and differ in seed, optimizer settings (the learning rate, ...) or loss variant take their
steps together instead (``hydra/launcher=fused`` groups them; hydra_plugins/runner_fused/). A
family may let jobs differ in a setting that changes a shape (the density family's ``loss.k``):
their step inputs are zero-padded to the group's largest and each job's loss ignores the padding.

* each parameter of the group is one stacked tensor, [jobs, ...]; every job's model holds views
  into it, so its optimizer, schedule, checkpoints and evaluation are exactly a run alone's;
* a step draws each job's randomness from the job's own generator (``StepInParts.train_inputs``),
  runs all forward passes as one call (``torch.func.vmap`` over ``functional_call``: each
  Linear becomes one batched matrix product), adds each job's loss (``StepInParts.loss_sum``), takes
  every job's gradients at once into the stacked gradient whose slices are the jobs' ``.grad``,
  and lets each job's optimizer step (``OptimizerStep.update``: divide, clip, step);
* the engine's one loop (runner/engine/loop.py ``fit``) moves the group in lockstep; each job
  logs, validates and checkpoints into its own run folder. A job that fails (a NaN) or stops
  early closes alone and the others go on; its slot keeps computing, unused.

A fused job draws the same random numbers as the job run alone (init, data order, noise), so it
takes the same steps; only the batched matrix products may round differently.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from runner.config import Config
from runner.engine import checkpoint as ckpt
from runner.config import compat, rules
from runner.engine import devices
from runner.engine.family import StepInParts
from runner.engine.graphs import GraphedStep, step_slice
from runner.engine.loop import Trainer
from runner.engine.windows import Window
from runner.engine.precision import autocast
from runner.engine.run import run_jobs
from runner.engine.stacked_optimizer import StackedOptimizer, stackable_optimizers

log = logging.getLogger("runner")


class StackedParameters:
    """Every job's parameters as slices of one tensor per name: the jobs' models are rebound to
    views of it (their Parameters and ``.grad`` alias the stack's storage)."""

    def __init__(self, models: Sequence[nn.Module]):
        if any(True for _ in models[0].buffers()):
            raise RuntimeError("fused jobs need models without buffers (BatchNorm statistics cannot be stacked)")
        self.names = [name for name, _ in models[0].named_parameters()]
        self.stacked: dict[str, Tensor] = {}
        self.grads: list[Tensor] = []
        for name in self.names:
            data = torch.stack([m.get_parameter(name).detach() for m in models])
            grad = torch.zeros_like(data)
            for j, model in enumerate(models):
                module_name, _, leaf = name.rpartition(".")
                view = nn.Parameter(data[j])  # a leaf that shares the stack's storage
                view.grad = grad[j]
                setattr(model.get_submodule(module_name), leaf, view)
            self.stacked[name] = data.requires_grad_()
            self.grads.append(grad)

    def take_gradients(self, total: Tensor, scale: float) -> None:
        """d total / d stack, times ``scale`` (1 / units), into the stacked gradients (each job's
        ``.grad`` is its slice): the run alone's order, sum then backward then divide."""
        grads = torch.autograd.grad(total, list(self.stacked.values()))
        # Scaled in the stack's own buffers: autograd may hand one tensor to two inputs (the LSTM's
        # two biases share a gradient), and scaling the returned tensors in place would scale it twice.
        # (Measured on an H100, 2026-12-07: one torch.mul(out=) a parameter instead saves the
        # multi-tensor launch but runs the same strided elementwise kernel, and six jobs' group
        # step was not faster; compiled, the copy failed in Inductor. benchmarks/README.md)
        torch._foreach_copy_(self.grads, list(grads))
        torch._foreach_mul_(self.grads, scale)


def stack_trees(trees: Sequence[Any]) -> Any:
    """Nested tuples/lists/dicts of tensors, one per job, as one such structure of [jobs, ...].
    Tensors of different shapes (jobs that differ in a family's ``FUSION_PADDED`` setting) are
    zero-padded at the end of each dimension to the largest; the family's loss ignores the padding."""
    leaves, spec = tree_flatten(trees[0])
    columns = zip(*(tree_flatten(tree)[0] for tree in trees))
    return tree_unflatten([torch.stack(padded(column)) for column in columns], spec)


def padded(tensors: Sequence[Tensor]) -> list[Tensor]:
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors))]
    out = []
    for t in tensors:
        if list(t.shape) != shape:
            pad = [p for size, full in zip(reversed(t.shape), reversed(shape)) for p in (0, full - size)]
            t = torch.nn.functional.pad(t, pad)
        out.append(t)
    return out


class FusedStep:
    """One optimizer step of every job in the group (see the module docstring); ``slots[j]``
    is job j's Trainer, None where a job failed before training (its slot is computed, unused).
    Everything the jobs share runs once for all: the forward pass, the loss where every job has
    the same one, the division by the unit count; per job are only the random draws and the
    optimizer step."""

    def __init__(self, slots: Sequence[Trainer | None], stacks: StackedParameters, *, precision: str,
                 captured: bool, steps_per_launch: int, compiled: bool, compile_mode: str = "default",
                 compiled_optimizer: bool = False,
                 stacked_optimizer: bool = False):
        self.slots, self.stacks, self.precision = list(slots), stacks, precision
        live = [t for t in self.slots if t is not None]
        self.device = live[0].ctx.device
        family, model = live[0].family, live[0].family.raw_model
        self.same_loss = all(type(t.family.loss) is type(family.loss) and repr(t.family.loss) == repr(family.loss)
                             for t in live)

        def with_params(params: dict[str, Tensor]) -> Callable[..., Any]:
            """The model called with one job's parameters (a slice of the stack, under vmap)."""
            return lambda *args, **kwargs: functional_call(model, params, args, kwargs)

        def outputs(params: dict[str, Tensor], inputs: Any) -> Any:
            return family.forward(with_params(params), inputs)

        def loss(params: dict[str, Tensor], inputs: Any) -> tuple[Tensor, Any]:
            return family.model_and_loss(with_params(params), inputs)

        loss_families = [t.family if t is not None else family for t in self.slots]  # a closed slot: any loss

        def losses(params: dict[str, Tensor], inputs: list[Any]) -> tuple[Tensor, Any]:
            """Every job's loss sum [jobs] and carried state; the forward passes (and the loss, where
            every job has the same) as one batched call."""
            stacked = stack_trees(inputs)
            if self.same_loss:
                sums, carried = vmap(loss)(params, stacked)
                return sums.float(), carried
            batched = vmap(outputs)(params, stacked)
            sums = [f.loss_sum(tree_map(lambda o, j=j: o[j], batched), inputs[j]).float()
                    for j, f in enumerate(loss_families)]
            return torch.stack(sums), family.carried(batched)

        # Compiled, the inputs' stacking, the batched forward and every job's loss become generated
        # kernels (each job's own loss, run eagerly, would be dozens of tiny launches per job).
        self.losses = torch.compile(losses, mode=compile_mode) if compiled else losses
        # Jobs of one optimizer setting step as one optimizer over the stack (StackedOptimizer);
        # else, with trainer.compile_optimizer, every job's optimizer step in one compiled call
        # (compiled one by one, each would be a recompilation of its own); else each its own.
        optimizers = [t.optimizer for t in live]
        self.stacked_optimizer = StackedOptimizer(optimizers, [t.family.raw_model for t in live], stacks,
                                                  compiled_optimizer) if stacked_optimizer else None
        self.step_optimizers = torch.compile(lambda: [o.step() for o in optimizers]) \
            if compiled_optimizer and not stacked_optimizer else None
        self.source = optimizers[0]  # a live job's optimizer (StackedOptimizer.step)
        # Each job's running loss is a slice of one tensor: one addition a step for the group.
        self.running = torch.zeros(len(self.slots), device=self.device, dtype=torch.float64)
        for j, t in enumerate(self.slots):
            if t is not None:
                t.stepper.join_group(self.running[j])  # take_gradients overwrites the gradients
        generators = tuple(t.family.generator for t in live)
        self.graphed = GraphedStep(self.step, generators=generators) if captured else None
        self.steps_per_launch = steps_per_launch
        self.graphed_launch = GraphedStep(self.steps, generators=generators) if steps_per_launch > 1 else None
        self.units = 0

    def take_steps(self, windows: list[Window | None], step_index: int) -> list[tuple[int, int]]:
        """The engine's ``take_steps`` (loop.py ``fit``): windows of the live trainers, in slot
        order among them; None for a closed job. Returns (steps, units) per window."""
        live = iter(windows)
        per_slot = [next(live) if t is not None else None for t in self.slots]
        ref = next(w for w in per_slot if w is not None)
        self.source = next(t.optimizer for t, w in zip(self.slots, per_slot) if w is not None)
        if ref.stacked is not None:  # several captured steps at once (trainer.steps_per_graph)
            self.graphed_launch([w.stacked if w is not None else ref.stacked for w in per_slot])
            steps = ref.steps
        else:
            batches = [next(w.micro_batches)[0] if w is not None else None for w in per_slot]
            first = next(b for b in batches if b is not None)
            batches = [first if b is None else b for b in batches]  # a closed slot computes on any batch
            if self.graphed is not None and self.graphed.accepts(batches):
                self.graphed(batches)
            else:
                self.step(batches)
            steps = 1
        for t, w in zip(self.slots, per_slot):
            if t is not None and w is not None:
                t.stepper.running_units += steps * self.units
        return [(steps, steps * self.units)] * len(windows)

    def step(self, batches: list[Any]) -> None:
        """Every job's optimizer step: written to be captured (no host reads, static shapes)."""
        families = [t.family if t is not None else None for t in self.slots]
        lead = next(f for f in families if f is not None)
        with autocast(self.device, self.precision, cache_enabled=False):
            inputs = [(f or lead).train_inputs(b) for f, b in zip(families, batches)]
            losses, carried = self.losses(self.stacks.stacked, inputs)
            for j, f in enumerate(families):  # each job's recurrent state, if any, for its next step
                if f is not None:
                    f.keep(tree_map(lambda c, j=j: c[j], carried))
        self.units = lead.units(inputs[0])  # the jobs' batches have one shape
        self.stacks.take_gradients(losses.sum(), 1.0 / self.units)
        together = self.stacked_optimizer is not None or self.step_optimizers is not None
        for t in self.slots:
            if t is not None:  # clip, and step unless the group steps together: the gradients are divided already
                t.stepper.update(None, skip=together)
        if self.stacked_optimizer is not None:
            self.stacked_optimizer.step(self.source)
        elif self.step_optimizers is not None:
            self.step_optimizers()
        self.running.add_(losses.detach())  # a NaN or Inf stays in a job's slice until it is checked

    def steps(self, stacks: list[Any]) -> None:
        """trainer.steps_per_graph steps of every job, one per stacked batch, captured as one graph."""
        for s in range(self.steps_per_launch):
            self.step([step_slice(batches, s) for batches in stacks])


def own_generator(device: torch.device) -> torch.Generator:
    """A generator in the state of ``device``'s global one now: the stream this job, run alone,
    would go on drawing from."""
    generator = torch.Generator(device=device)
    generator.set_state(torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state())
    return generator


class FusedGroup:
    """How fused jobs train together (runner/engine/run.py ``run_jobs``): one data bundle, each
    job drawing from its own generator, every parameter stacked before any optimizer exists, and
    one ``FusedStep`` for the group."""

    shares_data = in_group = True

    def __init__(self) -> None:
        self.stacks: StackedParameters | None = None
        self.stacked_jobs: list[bool] = []  # which jobs have a slice of the stack (their model was built)

    def built(self, life: Any, family: StepInParts) -> None:
        family.generator, family.rng_at_build = own_generator(life.ctx.device), ckpt.rng_state()

    def bind(self, families: list[StepInParts | None]) -> None:
        built = [f for f in families if f is not None]
        self.stacked_jobs = [f is not None for f in families]
        if built:
            self.stacks = StackedParameters([f.raw_model for f in built])

    def take_steps(self, lives: list[Any], trainers: list[Trainer | None]) -> Callable[..., Any]:
        """The group's step; ``trainers`` in job order (None: failed before training)."""
        slots = [t for t, stacked in zip(trainers, self.stacked_jobs) if stacked]
        live = [t for t in trainers if t is not None]
        settings = live[0].settings
        step = FusedStep(slots, self.stacks, precision=settings.precision, captured=settings.cuda_graph,
                         steps_per_launch=settings.steps_per_graph, compiled=settings.compile,
                         compile_mode=settings.compile_mode, compiled_optimizer=settings.compile_optimizer,
                         stacked_optimizer=None not in slots and stackable_optimizers(
                             [life.config for life in lives if life.trainer is not None], [t.optimizer for t in live]))
        log.info("fused group of %d jobs%s: %s", len(live),
                 " (one optimizer over the stack)" if step.stacked_optimizer is not None
                 else " (each job steps its own optimizer)", ", ".join(str(t.run_dir) for t in live))
        return step.take_steps


def run_group(jobs: Sequence[tuple[Config, Path, dict[str, str], Any]]) -> list[int]:
    """Train jobs (config, run folder, choices, JobInfo) that fuse as one group; their exit codes."""
    return run_jobs(jobs, FusedGroup())


# Settings in which fused jobs may differ: each job has its own seed, optimizer and loss object,
# and its own loggers and display. A family may add settings that change its step's shapes, whose
# inputs are then padded (its module's ``FUSION_PADDED``: the density family's ``loss.k``).
FREE_KEYS = ("trainer.seed", "optim", "loss._target_", "logger", "trainer.progress", "resume", "name")


def fusion_key(config: Config) -> str:
    """Jobs with equal keys fuse: their settings but the free ones, and the step they resume
    from (a group moves in lockstep)."""
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    for key in (*FREE_KEYS, *getattr(compat.family_module(config), "FUSION_PADDED", ())):
        *path, last = key.split(".")
        node = settings
        for part in path:
            node = node.get(part, {})
        node.pop(last, None)
    last = ckpt.load_last(Path(config.resume)) if config.resume else None
    step = last["loop"]["step"] if last is not None else 0
    return repr((settings, step))


def fusion_groups(configs: Sequence[Config]) -> list[list[int]]:
    """The jobs (indices into ``configs``) in groups: jobs that fuse share a group, in the order
    of their first job; a job that cannot fuse is a group of one (the reason is logged)."""
    groups: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        blocker = rules.fusion_blocker(config)
        if blocker:
            log.warning("job %d runs alone: %s", i, blocker)
        groups.setdefault(f"alone {i}" if blocker else fusion_key(config), []).append(i)
    return list(groups.values())
