"""``device=ddp`` without an external launcher: start one worker process per device.

Under torchrun (RANK is set) this does nothing and every process runs the job itself. Either
way there is one run folder, written by rank 0 only.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

from runner.errors import EXIT_FAILED, UserError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_yaml: str, run_dir: str | None, codes) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from runner.engine.run import run

    cfg = OmegaConf.create(cfg_yaml)
    codes[rank] = run(cfg, Path(run_dir) if run_dir and rank == 0 else None)


def worker_count(cfg: DictConfig) -> int:
    n = int(cfg.device.devices)
    if n <= 0:
        n = torch.cuda.device_count()
        if n == 0:
            raise UserError("device=ddp with device.devices=0 means one process per GPU, but no GPU is visible; "
                            "set device.devices=N device.backend=gloo to run N CPU processes")
    return n


def maybe_spawn(cfg: DictConfig, run_dir: Path) -> int | None:
    """Exit code of the spawned job, or None when this process should run the job itself."""
    strategy = getattr(cfg.device.strategy, "value", cfg.device.strategy)
    if strategy != "ddp" or "RANK" in os.environ:
        return None
    world = worker_count(cfg)
    codes = mp.get_context("spawn").Manager().list([EXIT_FAILED] * world)
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    mp.start_processes(_worker, args=(world, _free_port(), cfg_yaml, str(run_dir), codes), nprocs=world,
                       join=True, start_method="spawn")
    return int(codes[0])
