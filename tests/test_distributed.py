"""DDP on the CPU with gloo: 2 processes equal 1 process at twice the batch; evaluation counts
every sample once; torchrun rendezvous across two "nodes"; a ddp multirun."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from pathlib import Path

from conftest import ROOT, only_run_folder, run_cli, run_in_process

BASE = ["experiment=regression", "trainer.progress=none", "optim=sgd", "optim.momentum=0.0", "optim.lr=0.05",
        "dataset.n_train=250", "trainer.max_epochs=2"]
DDP2 = ["device=ddp", "device.devices=2", "device.backend=gloo"]


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_two_processes_equal_one_process_at_twice_the_batch(tmp_path):
    # 250 samples: the shards (125 each) and the last batches are uneven on purpose.
    one = run_cli(*BASE, "device=cpu", "trainer.batch_size=16", f"output_root={tmp_path / 'one'}")
    two = run_cli(*BASE, *DDP2, "trainer.batch_size=8", f"output_root={tmp_path / 'two'}")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = only_run_folder(tmp_path / "one"), only_run_folder(tmp_path / "two")
    wa, wb = weights(a), weights(b)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6)
    sa, sb = summary(a), summary(b)
    assert sa["steps"] == sb["steps"] and sa["samples_seen"] == sb["samples_seen"] == 500
    assert sb["device"].startswith("ddp x2")


def test_parallel_evaluation_counts_every_sample_once(tmp_path):
    # 1001 divides by neither the world size (2) nor the batch size (64).
    common = [*BASE, "dataset.n_val=1001", "dataset.n_test=1001", "trainer.eval_batch_size=64"]
    code, trained = run_in_process(tmp_path / "one", *common, "device=cpu", "trainer.batch_size=16")
    assert code == 0
    ckpt = trained / "checkpoints" / "last.pt"
    for name, device in (("eval1", ["device=cpu"]), ("eval2", DDP2)):
        res = run_cli(*common, *device, "mode=eval", f"ckpt_path={ckpt}", f"output_root={tmp_path / name}")
        assert res.returncode == 0, res.stderr
    s1, s2 = summary(only_run_folder(tmp_path / "eval1")), summary(only_run_folder(tmp_path / "eval2"))
    assert s1["eval_samples"] == s2["eval_samples"] == {"val": 1001, "test": 1001}
    assert set(s1["metrics"]) == {"val/loss", "test/loss"}  # the sample count is bookkeeping, not a metric
    for key in s1["metrics"]:
        # equal up to float32 summation order: the shards cut the batches at other places
        assert s2["metrics"][key] == pytest.approx(s1["metrics"][key], rel=1e-6), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # torchrun's two-node rendezvous; the spawned DDP tests here cover the process group
def test_two_node_torchrun_rendezvous_on_localhost(tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=runner-test",
           "-m", "runner", *BASE, *DDP2[:1], "device.backend=gloo", "trainer.batch_size=8",
           f"output_root={tmp_path}"]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [n.communicate(timeout=300) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outputs
    run_dir = only_run_folder(tmp_path)  # exactly one run folder for the two processes
    s = summary(run_dir)
    assert s["status"] == "completed" and s["device"].startswith("ddp x2")
    assert s["samples_seen"] == 500


@pytest.mark.slow  # a sweep of two DDP jobs, two gloo workers each: ~24 s of process starts
def test_ddp_multirun_gives_one_folder_per_job(tmp_path):
    result = run_cli("-m", *BASE, *DDP2, "trainer.batch_size=8", "trainer.seed=0,1", f"output_root={tmp_path}")
    assert result.returncode == 0, result.stderr
    (sweep,) = (tmp_path / "multirun").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert summary(sweep / job)["status"] == "completed"
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # ~1 min; the killed-process tests below cover a DDP run's ending
def test_ddp_sigterm_checkpoints_once_and_logs(tmp_path):
    """SIGTERM to `python -m runner device=ddp`: the workers hear it once, rank 0 checkpoints,
    the run exits 143 (recorded as SIGTERM), rank 0 wrote run.log, and resume= finishes it."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "runner", *BASE, *DDP2, "trainer.batch_size=8", "trainer.max_epochs=300",
                             "trainer.log_every_n_steps=1", f"output_root={tmp_path}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list(tmp_path.glob("runs/*/checkpoints/last.pt")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err[-2000:]
    run_dir = only_run_folder(tmp_path)
    s = summary(run_dir)
    assert s["status"] == "interrupted" and s["error"] == "interrupted by SIGTERM" and s["stop_reason"] == "interrupted"
    assert "run folder" in (run_dir / "run.log").read_text()
    assert (out + err).count("interrupted by SIGTERM") == 1  # one message, from rank 0
    epoch = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["loop"]["epoch"]
    resumed = run_cli(f"resume={run_dir}", f"trainer.max_epochs={epoch + 1}")  # one epoch more, not 300
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert summary(run_dir)["status"] == "completed"


def _vote(rank: int, port: int, hear_at: int, out) -> None:
    """A worker of the stop vote: rank 1 hears a signal after step ``hear_at``, rank 0 never does."""
    import os
    import signal

    import torch.distributed as dist

    from runner.engine.signals import SignalFlag

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    flag = SignalFlag(distributed=True)
    for step in range(1, 1000):
        if rank == 1 and step == hear_at:
            flag.signum = signal.SIGTERM
        signum, _ = flag.agreed(now=step % 250 == 0)  # an epoch end every 250 steps
        if signum is not None:
            out[rank] = (step, signum)
            break
    dist.destroy_process_group()


@pytest.mark.parametrize("hear_at", [6, 249])
def test_ranks_stop_after_the_same_step_when_one_hears_the_signal(hear_at):
    """The launcher's signal reaches each worker at its own moment; all ranks must still stop after
    the same step (a rank that went on would wait forever in its next all-reduce)."""
    import signal
    import time

    import torch.multiprocessing as mp

    from runner.engine.signals import SignalFlag

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.get_context("spawn").Manager().dict()
    workers = mp.start_processes(_vote, args=(port, hear_at, out), nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 60
    finished = False
    while not finished and time.time() < deadline:
        finished = workers.join(timeout=5)  # True once every worker has exited
    for process in workers.processes:
        process.kill()
    assert finished, f"a rank did not stop: {dict(out)}"
    assert out[0] == out[1] and out[0][1] == signal.SIGTERM, dict(out)
    stopped_at = out[0][0]
    # the ranks vote every few steps (at most 100 apart) and at each epoch end
    assert hear_at < stopped_at <= min(hear_at + 2 * SignalFlag.MAX_STEPS_BETWEEN_VOTES, 250 * (hear_at // 250 + 1))


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


# rank 0 in the default run; rank 1 and the launcher (~25 s each) with -m slow.
@pytest.mark.parametrize("killed", ["rank0", *(pytest.param(k, marks=pytest.mark.slow) for k in ("rank1", "launcher"))])
def test_a_killed_process_of_a_ddp_run_leaves_a_true_summary_and_no_orphans(tmp_path, killed):
    """SIGKILL of one worker or of the launcher (runner's own spawner) mid-run: the summary ends
    failed or interrupted, one line says so, and no process of the run is left running."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "runner", *BASE, *DDP2, "trainer.max_epochs=400",
                             "trainer.batch_size=8", f"output_root={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(tmp_path.glob("runs/*/checkpoints/last.pt")):
        time.sleep(0.5)  # until it trains: the first epoch's checkpoint
    # The workers among the launcher's children (its resource tracker is one too), started in rank order.
    workers = sorted(w for w in children_of(proc.pid) if b"spawn_main" in Path(f"/proc/{w}/cmdline").read_bytes()
                     and b"resource_tracker" not in Path(f"/proc/{w}/cmdline").read_bytes())
    assert len(workers) == 2, workers
    ranks = dict(enumerate(workers))
    victim = proc.pid if killed == "launcher" else ranks[int(killed[-1])]
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    run = only_run_folder(tmp_path)
    status = json.loads((run / "summary.json").read_text())["status"]
    left = [w for w in ranks.values() if Path(f"/proc/{w}").exists() and "Z" not in
            Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0]]
    assert not left, f"processes left running: {left}"
    if killed == "launcher":
        assert status == "interrupted", status  # the workers got SIGTERM and checkpointed
    else:
        assert proc.returncode == 1 and status == "failed", (proc.returncode, status, err[-2000:])
        assert len([line for line in (out + err).splitlines() if line.startswith("failed:")]) == 1, out + err
