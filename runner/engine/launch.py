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
from omegaconf import OmegaConf

from runner.config import Config, Strategy, typed
from runner.errors import EXIT_FAILED, UserError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, config_yaml: str, run_dir: str | None, choices: dict, codes) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from runner.engine.run import run

    config = typed(OmegaConf.create(config_yaml))
    codes[rank] = run(config, Path(run_dir) if run_dir and rank == 0 else None, choices)


def worker_count(config: Config) -> int:
    n = int(config.device.devices)
    if n < 0:
        raise UserError(f"device.devices={n} must be >= 0 (0: one process per visible GPU)")
    if n == 0:
        n = torch.cuda.device_count()
        if n == 0:
            raise UserError("device=ddp with device.devices=0 means one process per GPU, but no GPU is visible; "
                            "set device.devices=N device.backend=gloo to run N CPU processes")
    return n


def maybe_spawn(config: Config, run_dir: Path, choices: dict[str, str]) -> int | None:
    """Exit code of the spawned job, or None when this process should run the job itself."""
    if config.device.strategy != Strategy.ddp or "RANK" in os.environ:
        return None
    world = worker_count(config)
    codes = mp.get_context("spawn").Manager().list([EXIT_FAILED] * world)
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(config))
    mp.start_processes(_worker, args=(world, _free_port(), config_yaml, str(run_dir), dict(choices), codes),
                       nprocs=world, join=True, start_method="spawn")
    return int(codes[0])
