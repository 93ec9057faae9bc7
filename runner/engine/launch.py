"""``device=ddp`` without an external launcher: start one worker process per device.

Under torchrun or an srun of several tasks (runner/engine/slurm.py) this does nothing and every process runs the job itself. Either
way there is one run folder, written by rank 0 only. Rank 0 writes run.log; another rank that
fails writes what it logged to ``rank<r>.log`` beside it; only rank 0 prints. The workers leave
the terminal's process group, so that Ctrl-C reaches this process alone, and it passes the first
SIGINT or SIGTERM on to every worker once: each finishes its step, rank 0 writes the checkpoint,
and the run exits 130 or 143. A worker killed outright does not leave the others hanging: they
fail at their next collective or are stopped; a rank 0 killed before it could record the run's end
has it recorded by this process; a launcher killed outright takes its workers with it (SIGTERM).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
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


def _worker(rank: int, world: int, port: int, config_yaml: str, run_dir: str | None, choices: dict, codes: str,
            job: JobInfo | None = None) -> None:
    os.setpgrp()  # signals come from the parent, once (see the module docstring)
    die_with_parent()
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
    (Path(codes) / str(rank)).write_text(str(code))
    if rank != 0 and run_dir and code not in (EXIT_OK, *interrupted_codes()):
        (Path(run_dir) / f"rank{rank}.log").write_text("".join(f"{line}\n" for line in records.lines))


LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"


def die_with_parent() -> None:
    """A worker is sent SIGTERM when the launcher dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG):
    it then stops as on any SIGTERM, checkpoint written, instead of running on unwatched."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the worker notices at its next collective
        pass
    if os.getppid() == 1:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


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
    # Each worker leaves its exit code in a file: no Manager process, which would outlive a
    # launcher killed with SIGKILL.
    codes = Path(tempfile.mkdtemp(prefix="runner-codes-"))
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(config))
    workers = mp.start_processes(_worker, args=(world, _free_port(), config_yaml, str(run_dir), dict(choices),
                                                str(codes), job), nprocs=world, join=False, start_method="spawn")
    forwarded: list[int] = []

    def forward(signum: int, frame: object) -> None:
        if not forwarded:  # once: a second SIGINT to the workers would mean "stop without a checkpoint"
            forwarded.append(signum)
            for process in workers.processes:
                if process.is_alive():
                    os.kill(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, *requeue_signals())}
    try:
        wait_for(workers.processes)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    found = {rank: int((codes / str(rank)).read_text()) for rank in range(world) if (codes / str(rank)).is_file()}
    shutil.rmtree(codes, ignore_errors=True)
    if 0 in found:
        return found[0]
    return record_lost_rank0(run_dir, workers.processes[0].exitcode)


GRACE_S = 60.0  # how long the other ranks get to notice a dead one (gloo and NCCL raise) and record it


def wait_for(processes: list) -> None:
    """Until every worker has ended. Once one has died (a signal, a crash: a worker that fails records
    its code and exits 0), the others get GRACE_S seconds to fail on their own (rank 0 then records
    why), then SIGTERM, then SIGKILL: none is left behind."""
    died_at = None
    while any(p.is_alive() for p in processes):
        for p in processes:
            p.join(timeout=0.2)
        if died_at is None and any(p.exitcode not in (None, 0) for p in processes):  # killed, or crashed
            died_at = time.monotonic()
        if died_at is not None and time.monotonic() - died_at > GRACE_S:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for p in processes:
                    if p.is_alive():
                        os.kill(p.pid, sig)
                time.sleep(5)
            break


def record_lost_rank0(run_dir: Path, exitcode: int | None) -> int:
    """Rank 0 ended without an exit code (killed): the run folder's summary would go on saying
    running, so the launcher, still alive, records the failure and says it in one line."""
    from runner.engine.results import read_summary
    from runner.runs.files import atomic_write_json

    cause = (f"rank 0 was killed by {signal.Signals(-exitcode).name}" if exitcode is not None and exitcode < 0
             else f"rank 0 ended with exit code {exitcode} before recording the run's end")
    try:
        summary = read_summary(run_dir) or {}
        if summary.get("status", "running") == "running":
            atomic_write_json(Path(run_dir) / "summary.json", {**summary, "status": "failed", "error": cause})
    except (OSError, ValueError):
        pass
    print(f"failed: {cause} (see {Path(run_dir) / 'run.log'})", file=sys.stderr, flush=True)
    return EXIT_FAILED
