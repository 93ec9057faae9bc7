"""``device=ddp`` without an external launcher: start one worker process per device.

Under torchrun or an srun of several tasks (runner/engine/slurm.py) this does nothing and every process runs the job itself. Either
way there is one run folder, written by rank 0 only. Rank 0 writes run.log; another rank that
fails writes what it logged to ``rank<r>.log`` beside it; only rank 0 prints. The workers leave
the terminal's process group, so that Ctrl-C reaches this process alone, and it passes the first
SIGINT or SIGTERM on to every worker once: each finishes its step, rank 0 writes the checkpoint,
and the run exits 130 or 143.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from runner.config import Config, Strategy, typed
from runner.engine.slurm import distributed_env, requeue_signals
from runner.errors import EXIT_FAILED, EXIT_OK, UserError, interrupted_codes
from runner.loggers.base import JobInfo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, config_yaml: str, run_dir: str | None, choices: dict, codes,
            job: JobInfo | None = None) -> None:
    os.setpgrp()  # signals come from the parent, once (see the module docstring)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from runner.engine.run import run

    config = typed(OmegaConf.create(config_yaml))
    records = _Records()
    logging.getLogger().addHandler(records)
    logging.getLogger().setLevel(logging.INFO)
    if rank == 0 and run_dir:
        handler = logging.FileHandler(Path(run_dir) / "run.log", delay=True)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(handler)
    code = run(config, Path(run_dir) if run_dir and rank == 0 else None, choices, job=job)
    codes[rank] = code
    if rank != 0 and run_dir and code not in (EXIT_OK, *interrupted_codes()):
        (Path(run_dir) / f"rank{rank}.log").write_text("".join(f"{line}\n" for line in records.lines))


LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"


class _Records(logging.Handler):
    """What a worker logged, kept in memory: written to rank<r>.log only if that rank fails."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


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


def maybe_spawn(config: Config, run_dir: Path, choices: dict[str, str], job: JobInfo | None = None) -> int | None:
    """Exit code of the spawned job, or None when this process should run the job itself."""
    if config.device.strategy != Strategy.ddp or distributed_env(address=False):  # torchrun, srun: started already
        return None
    world = worker_count(config)
    codes = mp.get_context("spawn").Manager().list([EXIT_FAILED] * world)
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(config))
    workers = mp.start_processes(_worker, args=(world, _free_port(), config_yaml, str(run_dir), dict(choices), codes,
                                                job), nprocs=world, join=False, start_method="spawn")
    forwarded: list[int] = []

    def forward(signum: int, frame: object) -> None:
        if not forwarded:  # once: a second SIGINT to the workers would mean "stop without a checkpoint"
            forwarded.append(signum)
            for process in workers.processes:
                if process.is_alive():
                    os.kill(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, *requeue_signals())}
    try:
        while not workers.join():
            pass
    except mp.ProcessExitedException:  # a worker died without a code (killed): the run failed
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return int(codes[0])
