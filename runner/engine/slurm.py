"""SLURM: the process group a job step describes, and a job that requeues itself at its time limit.

**The process group.** ``srun`` (and submitit's launcher, whose tasks srun starts) gives each task
SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS and SLURM_JOB_NODELIST, not torchrun's RANK /
WORLD_SIZE / MASTER_ADDR. ``distributed_env`` is the one place that reads either: RANK and the
rest where a launcher set them (torchrun, runner's own spawner), else SLURM's task variables when
the step has several tasks: SLURM_PROCID -> RANK, SLURM_LOCALID -> LOCAL_RANK, SLURM_NTASKS ->
WORLD_SIZE, the first host of SLURM_JOB_NODELIST -> MASTER_ADDR, a port derived from
SLURM_JOB_ID -> MASTER_PORT (a MASTER_ADDR / MASTER_PORT you set wins). devices.py (joining the
group), launch.py (whether to spawn workers) and runs/folders.py (which process writes the run
folder) all ask it, so they agree.

**Requeue.** SLURM warns a job before its time limit with the signal of ``--signal=USR2@90``
(submitit's launcher asks for SIGUSR2 ``signal_delay_s`` before the limit). runner's SignalFlag
takes it like SIGTERM: the current step finishes, ``checkpoints/last.pt`` is written, the run is
recorded as interrupted (exit code 128 + the signal: 140). Then ``requeue`` puts the job back
in the queue:

* in a submitit job the signal is passed on to submitit's own handler, which runner's held back
  while the checkpoint was written: on the first task it checkpoints the launcher's callable
  (the same job again), requeues it (``scontrol requeue``; the local executor restarts it) and
  counts the time-outs against ``max_num_timeout``. The requeued job replays its sweep job into
  the same job folder, which continues from its checkpoint (``continued_in_sweep``);
* in a plain SLURM job (``srun python -m runner ...``), rank 0 runs ``scontrol requeue``. The
  requeued job (SLURM_RESTART_COUNT > 0) runs the same command; ``requeued_folder`` finds the
  folder its first start claimed (a pointer ``<output_root>/.slurm/<job>-<runs|multirun>-<command>`` written
  then) and it continues there;
* elsewhere nothing is requeued: the run says ``continue with resume=<run folder>``.

SIGTERM checkpoints and stops (143) but does not requeue: ``scancel`` sends it, and a cancelled
job must stay cancelled. A partition that preempts with PreemptMode=REQUEUE requeues the job
itself after SIGTERM, and the requeued job continues its folder in the same way.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Mapping

from runner.errors import UserError

log = logging.getLogger(__name__)

LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
PORT_BASE, PORT_SPAN = 20000, 20000  # MASTER_PORT = 20000 + job id mod 20000: the same on every task of a job


# --- SLURM_JOB_NODELIST ------------------------------------------------------------------------
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def parse_nodelist(text: str) -> list[str]:
    """The hosts of a SLURM node list: ``node[01-03,07],gpu5`` -> node01, node02, node03, node07,
    gpu5 (a range keeps its first number's zero padding; ``rack[1-2]-n[1-2]`` is the product).
    Raises ValueError naming what cannot be read."""
    hosts: list[str] = []
    for item in _top_level_items(text):
        names = [""]
        rest = item
        while rest:
            if rest[0] == "[":
                close = rest.find("]")
                if close < 0:
                    raise ValueError(f"'[' without ']' in {item!r}")
                names = [n + suffix for n in names for suffix in _expand(rest[1:close], item)]
                rest = rest[close + 1:]
            else:
                literal = re.match(r"[^\[\]]+", rest)
                if literal is None:
                    raise ValueError(f"']' without '[' in {item!r}")
                names = [n + literal.group(0) for n in names]
                rest = rest[literal.end():]
        hosts.extend(names)
    if not hosts:
        raise ValueError("no host in it")
    return hosts


def _top_level_items(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += {"[": 1, "]": -1}.get(c, 0)
        if depth not in (0, 1):
            raise ValueError("nested or unbalanced brackets")
        if c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    if any(not item.strip() or item != item.strip() for item in items):
        raise ValueError("an empty host name or a space")
    return items


def _expand(ranges: str, item: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        m = _RANGE.fullmatch(part)
        if m is None:
            raise ValueError(f"[{ranges}] in {item!r}: {part!r} is not a number or a range a-b")
        low, high = m.group(1), m.group(2) or m.group(1)
        if int(high) < int(low):
            raise ValueError(f"[{ranges}] in {item!r}: the range {part} runs backwards")
        out.extend(f"{n:0{len(low)}d}" for n in range(int(low), int(high) + 1))
    return out


def first_host(environ: Mapping[str, str]) -> str:
    for key in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        text = environ.get(key)
        if text:
            try:
                return parse_nodelist(text)[0]
            except ValueError as e:
                raise UserError(f"{key}={text!r} is not a SLURM node list ({e}); expected e.g. "
                                "node[01-04],other") from None
    raise UserError("SLURM started several tasks but set no SLURM_JOB_NODELIST: set MASTER_ADDR to the first "
                    "task's host")


def _int(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = environ.get(key)
    if value is None and default is not None:
        return default
    try:
        return int(str(value))
    except ValueError:
        raise UserError(f"{key}={value!r} is not a whole number") from None


def port_of(job_id: str) -> int:
    """A port every task of the job derives alike; consecutive jobs sharing a node get different ones."""
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return PORT_BASE + number % PORT_SPAN


# --- the process group -------------------------------------------------------------------------
def distributed_env(environ: Mapping[str, str] | None = None, address: bool = True) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT of this process where it is one of
    several that an external launcher started (torchrun, runner's spawner, or a SLURM step of
    several tasks); empty for a process alone. A launcher's RANK wins over SLURM's variables.
    ``address=False``: the ranks alone (the node list is not read)."""
    env = os.environ if environ is None else environ
    if "RANK" in env:
        return {key: env[key] for key in LAUNCHER_KEYS if key in env}
    if "SLURM_PROCID" not in env:
        return {}
    world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
    if world <= 1:
        return {}  # one task: runner's own spawner may still start device.devices workers
    rank = _int(env, "SLURM_PROCID")
    if not 0 <= rank < world:
        raise UserError(f"SLURM_PROCID={rank} is not below SLURM_NTASKS={world}")
    nodes = max(1, _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_JOB_NUM_NODES", 1)))
    found = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(_int(env, "SLURM_LOCALID", 0)),
             "LOCAL_WORLD_SIZE": str(max(1, world // nodes))}
    if address:
        found["MASTER_ADDR"] = env.get("MASTER_ADDR") or first_host(env)
        found["MASTER_PORT"] = env.get("MASTER_PORT") or str(port_of(env.get("SLURM_JOB_ID", "0")))
    return found


def process_rank() -> int:
    """This process's rank among those an external launcher started (0 for a process alone)."""
    return int(distributed_env(address=False).get("RANK", "0"))


def world_size() -> int:
    """How many processes an external launcher started (1 for a process alone)."""
    return int(distributed_env(address=False).get("WORLD_SIZE", "1"))


def export_distributed_env() -> dict[str, str]:
    """Write the mapping into os.environ (never over a variable already set), as torchrun would
    have: ``init_process_group``'s env:// reads MASTER_ADDR / MASTER_PORT there, and so does any
    code that reads RANK."""
    found = distributed_env()
    for key, value in found.items():
        os.environ.setdefault(key, value)
    return found


# --- requeue ------------------------------------------------------------------------------------
def requeue_signals() -> tuple[int, ...]:
    """The signals that mean "checkpoint, then requeue": SIGUSR2 (``--signal=USR2@90``, submitit's
    default) and the one $SUBMITIT_PREEMPT_SIGNAL names, as submitit reads it."""
    named = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG"),
                    signal.SIGUSR2)
    return tuple(dict.fromkeys((signal.SIGUSR2, named)))


def job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The SLURM job to requeue (an array task as ``<array job>_<task>``, as submitit names it)."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def requeue(code: int, run_dir: Path | str | None) -> bool:
    """After a run stopped on a requeue signal (``code`` is 128 + that signal) with its checkpoint
    written: requeue the job (see the module docstring). True where it was requeued (this process
    should then end quietly); False where nothing requeued it (the run stays interrupted).
    Under submitit, the first task's handler ends the process itself (SystemExit)."""
    signum = code - 128
    if signum not in requeue_signals():
        return False
    if os.environ.get("SUBMITIT_EXECUTOR"):
        handler = signal.getsignal(signum)
        if callable(handler) and handler is not signal.default_int_handler:
            log.info("passing %s on to submitit's handler: it checkpoints the job and requeues it",
                     signal.Signals(signum).name)
            signal.raise_signal(signum)  # the first task: submitit requeues and exits (SystemExit) here
            return True  # the other tasks: the first one requeues the job
    job = job_id()
    if job is None:
        return False
    if process_rank() != 0:
        return True  # rank 0 requeues the whole job
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60, capture_output=True, text=True)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        log.warning("could not requeue SLURM job %s (%s); continue it with resume=%s", job,
                    str(detail).strip().splitlines()[-1] if str(detail).strip() else type(e).__name__, run_dir)
        return False
    log.warning("requeued SLURM job %s: when it starts again it continues in %s", job, run_dir)
    return True


# --- the folder of a requeued job ---------------------------------------------------------------
def restart_count() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def _pointer(base: str) -> Path | None:
    """Where a SLURM job records the folder it claimed for ``base``: keyed by the job and its
    command line, so that another command of the same batch script claims its own."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    command = hashlib.sha1("\0".join(sys.argv[1:]).encode()).hexdigest()[:12]
    kind = Path(base).parent  # <output_root>/runs or <output_root>/multirun
    return kind.parent / ".slurm" / f"{job}-{kind.name}-{command}"


def requeued_folder(base: str) -> str | None:
    """A requeued SLURM job's folder: the one its first start claimed for the same command (every
    rank reads it alike), or None."""
    pointer = _pointer(base) if restart_count() > 0 else None
    if pointer is None or not pointer.is_file():
        return None
    folder = pointer.read_text().strip()
    return folder if folder and Path(folder).is_dir() else None


def remember_folder(base: str, folder: str) -> str:
    """Record the folder this SLURM job claimed (rank 0), for the job to find after a requeue."""
    pointer = _pointer(base)
    if pointer is not None and process_rank() == 0:
        from runner.runs.files import atomic_write_text

        try:
            atomic_write_text(pointer, f"{Path(folder).resolve()}\n")
        except OSError as e:  # the run goes on; a requeue would then start a new folder
            log.warning("could not record the run folder for a SLURM requeue at %s: %s", pointer, e.strerror or e)
    return folder
