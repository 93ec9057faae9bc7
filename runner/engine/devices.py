"""Device strategies in one place: cpu, gpu (one CUDA device by index), auto, and ddp.

The loop talks to a ``DeviceContext`` only: where tensors go, whether this process writes
results, how evaluation state is reduced, and how the model is wrapped. Under one process the
reductions are identities, so the same code path serves every strategy.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from runner.engine.slurm import export_distributed_env
from runner.errors import UserError


@dataclass
class DeviceContext:
    device: torch.device
    strategy: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            where = f"cuda:{self.device.index} ({name})"
        else:
            where = "cpu"
        return where if self.world_size == 1 else f"{self.strategy} x{self.world_size} [{where} on rank 0]"

    # --- moving data -----------------------------------------------------------------------
    def to_device(self, batch: Any) -> Any:
        non_blocking = self.device.type == "cuda"
        if isinstance(batch, Tensor):
            return batch.to(self.device, non_blocking=non_blocking)
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to_device(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self.to_device(v) for k, v in batch.items()}
        return batch

    # --- the model --------------------------------------------------------------------------
    def wrap(self, model: nn.Module, sync_batchnorm: bool) -> nn.Module:
        if not self.distributed:
            return model
        if sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, skip: bool) -> Iterator[None]:
        """Skip DDP's gradient all-reduce on micro-steps that do not step the optimizer."""
        if skip and isinstance(model, nn.parallel.DistributedDataParallel):
            with model.no_sync():
                yield
        else:
            yield

    # --- reductions (identities under one process) ------------------------------------------
    def all_reduce_sum(self, value: Tensor) -> Tensor:
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def gather_rows(self, rows: Tensor) -> Tensor:
        """Concatenate per-process rows of unequal lengths, in rank order, without padding rows
        ever reaching the result."""
        if not self.distributed:
            return rows
        n = torch.tensor([rows.shape[0]], device=rows.device)
        counts = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(counts, n)
        counts = [int(c) for c in counts]
        padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        padded[: rows.shape[0]] = rows
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        return torch.cat([g[:c] for g, c in zip(gathered, counts)])

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process (a collective: every rank calls it at the same point)."""
        if not self.distributed:
            return bool(flag)
        value = torch.tensor([int(bool(flag))], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast_object(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve(strategy: str, index: int = 0, backend: str = "nccl") -> DeviceContext:
    """The device for this process. ``ddp`` joins the process group that the launcher (runner's
    own, torchrun, or srun) described through RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR or
    SLURM's task variables (``slurm.distributed_env``)."""
    strategy = strategy.value if hasattr(strategy, "value") else str(strategy)
    if strategy == "cpu":
        return DeviceContext(torch.device("cpu"), "cpu")
    if strategy == "auto":
        if torch.cuda.is_available():
            return DeviceContext(torch.device("cuda", 0), "gpu")
        return DeviceContext(torch.device("cpu"), "cpu")
    if strategy == "gpu":
        if not torch.cuda.is_available():
            raise UserError("device=gpu but no CUDA device is visible; use device=cpu or device=auto")
        if not 0 <= index < torch.cuda.device_count():
            raise UserError(f"device.index={index} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(index)
        return DeviceContext(torch.device("cuda", index), "gpu")
    if strategy == "ddp":
        return _join_process_group(backend)
    raise UserError(f"device.strategy={strategy!r} is not known; allowed: auto, cpu, gpu, ddp")


def _join_process_group(backend: str) -> DeviceContext:
    if backend not in ("nccl", "gloo"):
        raise UserError(f"device.backend={backend!r} is not known; allowed: nccl, gloo")
    # torchrun's RANK / WORLD_SIZE, or a SLURM step's tasks (SLURM_PROCID, ...): runner/engine/slurm.py
    found = export_distributed_env()  # MASTER_ADDR / MASTER_PORT into os.environ, for env:// below
    if "RANK" not in found:
        raise UserError("device=ddp needs a launcher: run `python -m runner device=ddp`, torchrun, or srun with "
                        "several tasks")
    rank, world = int(found["RANK"]), int(found["WORLD_SIZE"])
    local_rank = int(found.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise UserError("device.backend=nccl needs CUDA devices; use device.backend=gloo on CPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                device_id=device if backend == "nccl" else None)
    return DeviceContext(device, "ddp", rank=rank, world_size=world, local_rank=local_rank)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
