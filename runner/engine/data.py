"""Which samples each process sees, in which order: seeded, resumable, and exact under DDP.

* Training: each epoch draws one global order from a generator seeded by (seed, epoch) — a
  permutation, or a weighted draw for balanced sampling — and process r takes every W-th entry
  from r. Process r's j-th batch of b samples plus the others' j-th batches is exactly the
  single-process j-th batch of W*b samples, so W processes reproduce one process at W times
  the batch. No padding duplicates are added.
* Evaluation (``exact_eval_indices``): contiguous, disjoint shards that cover the split once.
* Pre-batched datasets (char-LM streams): items are whole batches in order; each process takes
  its contiguous slice of the streams (rows).

A dataset may also say how its batches are made and finished, with two optional methods:
``collate(items) -> batch`` (used by the DataLoader instead of torch's default collate) and
``to_device(batch, device) -> batch`` (moves a batch and finishes it on the device, e.g. decodes
JPEGs there; the default moves every tensor). ``batch_mover`` picks the one the loop uses.

A dataset whose training items make random draws (augmentation) says so with ``seeded_items =
True``: its training sampler then yields ``(index, seed)`` pairs, the seed a function of
(trainer.seed, epoch, the sample's position in the epoch's global order) — see ``SeededIndices``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from runner.errors import UserError


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def train_order(n: int, seed: int, epoch: int, weights: Tensor | None = None) -> Tensor:
    g = epoch_generator(seed, epoch)
    if weights is not None:
        return torch.multinomial(weights.double(), n, replacement=True, generator=g)
    return torch.randperm(n, generator=g)


def exact_eval_indices(n: int, rank: int, world: int) -> range:
    """Process ``rank``'s contiguous share of ``n`` samples: every sample exactly once overall."""
    return range(rank * n // world, (rank + 1) * n // world)


def item_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the random draws of the sample at ``position`` of epoch ``epoch``'s global
    order: splitmix64 of the three, so that every bit is mixed (torch seeds its CPU generator
    from the low 32 bits only)."""
    mask = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + position) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) >> 1  # below 2**63: any torch generator takes it


class SeededIndices(Sequence):
    """One process's training indices as ``(index, item_seed(...))`` pairs. A sample's draws
    depend on where it stands in the epoch's order, not on the worker that loads it or on its
    worker's past: a run resumed mid-epoch (new workers) draws what the uninterrupted run drew,
    and W processes draw what one process draws. Process r's k-th sample stands at r + k*W."""

    def __init__(self, indices: Sequence[int], seed: int, epoch: int, first: int, stride: int):
        self.indices, self.seed, self.epoch, self.first, self.stride = indices, seed, epoch, first, stride

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, int]:
        return self.indices[k], item_seed(self.seed, self.epoch, self.first + k * self.stride)


class ListSampler(Sampler[int]):
    def __init__(self, indices: Sequence[int]):
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def rows_of_rank(batch: Any, rank: int, world: int) -> Any:
    if world == 1:
        return batch
    if isinstance(batch, Tensor):
        n = batch.shape[0]
        return batch[rank * n // world: (rank + 1) * n // world]
    if isinstance(batch, (list, tuple)):
        return type(batch)(rows_of_rank(b, rank, world) for b in batch)
    if isinstance(batch, dict):
        return {k: rows_of_rank(v, rank, world) for k, v in batch.items()}
    return batch


class RowShard(Dataset):
    """A pre-batched dataset seen through one process's slice of rows."""

    def __init__(self, dataset: Dataset, rank: int, world: int):
        self.dataset, self.rank, self.world = dataset, rank, world

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return rows_of_rank(self.dataset[i], self.rank, self.world)


def batch_mover(dataset: Dataset, default: Callable[[Any], Any], device: torch.device) -> Callable[[Any], Any]:
    """How a batch of ``dataset`` reaches the device: its own ``to_device`` if it has one."""
    own = getattr(dataset, "to_device", None)
    return default if own is None else (lambda batch: own(batch, device))


def _loader(dataset: Dataset, indices: Sequence[int], batch_size: int | None, num_workers: int, pin: bool,
            generator: torch.Generator) -> DataLoader:
    # The loader draws its workers' base seed from ``generator``: from the global RNG it would
    # take one draw per iterator, and a run resumed inside an epoch (a new iterator at a later
    # point of the global stream) would drift from the uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=ListSampler(indices), num_workers=num_workers,
                      collate_fn=getattr(dataset, "collate", None), pin_memory=pin, persistent_workers=False,
                      drop_last=False, generator=generator)


def train_loader(dataset: Dataset, *, batch_size: int, epoch: int, seed: int, rank: int, world: int,
                 weights: Tensor | None, prebatched: bool, skip_batches: int = 0, num_workers: int = 0,
                 pin: bool = False) -> DataLoader:
    """This process's training batches of one epoch, starting after ``skip_batches`` (resume)."""
    workers = epoch_generator(seed, epoch)
    if prebatched:
        return _loader(RowShard(dataset, rank, world), range(skip_batches, len(dataset)), None, num_workers, pin,
                       workers)
    order = train_order(len(dataset), seed, epoch, weights)[rank::world]
    start = skip_batches * batch_size
    indices = order[start:].tolist()
    if getattr(dataset, "seeded_items", False):
        indices = SeededIndices(indices, seed, epoch, first=rank + start * world, stride=world)
    return _loader(dataset, indices, batch_size, num_workers, pin, workers)


def train_batches_per_epoch(dataset: Dataset, batch_size: int, world: int, prebatched: bool) -> int:
    """Batches of rank 0 (the most: shards differ by at most one sample)."""
    if prebatched:
        return len(dataset)
    per_rank = -(-len(dataset) // world)
    return -(-per_rank // batch_size)


def limited(batches: int, limit: int | float) -> int:
    """``batches`` cut by a trainer.limit_*_batches value: a count, a fraction (at least one
    batch), or -1 for all of them."""
    if limit == -1:
        return batches
    if isinstance(limit, float):
        return max(1, int(limit * batches))
    return min(batches, int(limit))


def eval_items(dataset: Dataset, batch_size: int, prebatched: bool, limit: int | float) -> int:
    """How many items of a split an evaluation takes: all, or the first batches a limit leaves
    (evaluated exactly: each of them once, under any number of processes)."""
    n = len(dataset)
    if prebatched:
        return limited(n, limit)
    return min(n, limited(-(-n // batch_size), limit) * batch_size)


def eval_loader(dataset: Dataset, *, batch_size: int, rank: int, world: int, prebatched: bool,
                num_workers: int = 0, pin: bool = False, items: int | None = None) -> DataLoader:
    """``items``: the first items of the split only (a debug run's limit)."""
    workers = torch.Generator().manual_seed(0)  # evaluation leaves the training RNG alone
    n = len(dataset) if items is None else items
    if prebatched:
        return _loader(RowShard(dataset, rank, world), range(n), None, num_workers, pin, workers)
    return _loader(dataset, exact_eval_indices(n, rank, world), batch_size, num_workers, pin, workers)


class DeviceBatches:
    """Training batches cut on the device from a tensor-backed dataset (one with ``tensors``,
    like TensorDataset) moved to the device once: no DataLoader, no host-to-device copy per
    step. The order is the same seeded global order as ``train_loader``'s."""

    def __init__(self, dataset: Dataset, device: torch.device):
        if not hasattr(dataset, "tensors"):
            raise UserError(f"trainer.data_on_device=true needs a dataset held in tensors; {type(dataset).__name__} "
                            "builds its items on the fly: set trainer.data_on_device=false")
        self.tensors = tuple(t.to(device) for t in dataset.tensors)
        self.as_tuple = isinstance(dataset[0], (tuple, list))  # items are tuples (TensorDataset) or one tensor
        self.device, self.n = device, len(dataset)

    def epoch(self, *, batch_size: int, epoch: int, seed: int, rank: int, world: int, weights: Tensor | None,
              skip_batches: int = 0) -> "ResidentEpoch":
        order = train_order(self.n, seed, epoch, weights)[rank::world][skip_batches * batch_size:].to(self.device)
        return ResidentEpoch(self, order, batch_size)

    def eval_batches(self, *, batch_size: int, rank: int, world: int, items: int | None = None) -> Iterator[Any]:
        """This process's exact evaluation shard (of the first ``items``), as contiguous slices
        (views: no copies)."""
        shard = exact_eval_indices(self.n if items is None else items, rank, world)
        for start in range(shard.start, shard.stop, batch_size):
            rows = tuple(t[start:min(start + batch_size, shard.stop)] for t in self.tensors)
            yield rows if self.as_tuple else rows[0]


class ResidentEpoch:
    """One epoch of resident batches in the seeded order: ``next`` gives one batch, ``take(n)``
    the next n full batches stacked along a new first dimension (one gather for n captured
    steps, trainer.steps_per_graph)."""

    def __init__(self, source: DeviceBatches, order: Tensor, batch_size: int):
        self.source, self.order, self.batch_size, self.position = source, order, batch_size, 0

    def __iter__(self) -> "ResidentEpoch":
        return self

    def full_batches_left(self) -> int:
        return (self.order.shape[0] - self.position) // self.batch_size

    def _rows(self, size: int, shape: tuple[int, ...]) -> Any:
        idx = self.order[self.position:self.position + size]
        self.position += size
        rows = tuple(t[idx].view(*shape, *t.shape[1:]) for t in self.source.tensors)
        return rows if self.source.as_tuple else rows[0]

    def __next__(self) -> Any:
        left = self.order.shape[0] - self.position
        if left <= 0:
            raise StopIteration
        size = min(self.batch_size, left)
        return self._rows(size, (size,))

    def take(self, n: int) -> Any:
        assert n <= self.full_batches_left()
        return self._rows(n * self.batch_size, (n, self.batch_size))


def resident(dataset: Dataset, device: torch.device) -> DeviceBatches:
    """The device copy of a tensor-backed split, made once and kept on the dataset object (so it
    lives exactly as long as the dataset)."""
    copies = dataset.__dict__.setdefault("_device_copies", {})
    if str(device) not in copies:
        copies[str(device)] = DeviceBatches(dataset, device)
    return copies[str(device)]


def unaugmented(dataset: Dataset) -> Dataset:
    """The training split without its random augmentation (trainer.overfit_batches): a dataset
    that augments says how to leave it out (``without_augmentation()``); others are as they are."""
    drop = getattr(dataset, "without_augmentation", None)
    return drop() if drop is not None else dataset
