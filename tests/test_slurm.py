"""SLURM's task variables as the process group (runner/engine/slurm.py): the node list read as
submitit reads it, a bad one refused in one line, and two processes started with SLURM_* only
(no RANK) forming one gloo group that trains as one process at twice the batch."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, only_run_folder, run_cli
from runner.engine import slurm
from runner.errors import UserError

LISTS = ["node[01-04],other", "a[1-3,5],b[08-11]", "rack[1-2]-n[1-2]", "single", "gpu-[7-9]x,z[1]", "n[9-10]"]


@pytest.mark.parametrize("text", LISTS)
def test_the_node_list_expands_as_submitit_reads_it(text):
    submitit_slurm = pytest.importorskip("submitit.slurm.slurm")
    assert slurm.parse_nodelist(text) == submitit_slurm._parse_node_list(text)  # an independent reader


@pytest.mark.parametrize("text", ["node[01-04", "node[04-01]", "node[a-b]", "a,,b", "a]b", "x[[1]]", "n[1-2] ,m"])
def test_a_node_list_that_cannot_be_read_names_itself(text):
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": text}
    with pytest.raises(UserError, match=r"SLURM_JOB_NODELIST=.* is not a SLURM node list .*expected e\.g\. node\["):
        slurm.distributed_env(env)


def test_slurm_tasks_map_to_rank_world_and_the_first_host():
    job = {"SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}
    tasks = [slurm.distributed_env({**job, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 4)}) for r in range(8)]
    assert [t["RANK"] for t in tasks] == [str(r) for r in range(8)]
    assert [t["LOCAL_RANK"] for t in tasks] == ["0", "1", "2", "3"] * 2
    assert {(t["WORLD_SIZE"], t["LOCAL_WORLD_SIZE"], t["MASTER_ADDR"]) for t in tasks} == {("8", "4", "gpu07")}
    assert len({t["MASTER_PORT"] for t in tasks}) == 1  # every task derives the same port from the job id
    other = slurm.distributed_env({**job, "SLURM_JOB_ID": "4243", "SLURM_PROCID": "0"})
    assert other["MASTER_PORT"] != tasks[0]["MASTER_PORT"]  # the next job on the node gets another
    mine = slurm.distributed_env({**job, "SLURM_PROCID": "3", "MASTER_ADDR": "head", "MASTER_PORT": "29400"})
    assert (mine["MASTER_ADDR"], mine["MASTER_PORT"]) == ("head", "29400")  # yours win
    # torchrun's variables win over SLURM's (torchrun under srun: one task per node, its own ranks)
    torchrun = {**job, "SLURM_PROCID": "1", "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}
    assert slurm.distributed_env(torchrun)["RANK"] == "5" and slurm.distributed_env(torchrun)["WORLD_SIZE"] == "16"
    # one task (slurm_gpu): a process alone, runner's own spawner may still start workers
    assert slurm.distributed_env({**job, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == {}
    assert slurm.distributed_env({}) == {}


def test_several_tasks_without_ddp_exit_2(tmp_path):
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "1"}
    result = run_cli("experiment=regression", "device=cpu", f"output_root={tmp_path}", env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "error: 2 processes were started for this run (torchrun, or srun's tasks: SLURM_NTASKS) but device=cpu runs "
        "one: use device=ddp, or start one task (hydra.launcher.tasks_per_node=1)"]
    assert not (tmp_path / "runs").exists()  # rejected before training: no folder left


def test_a_bad_node_list_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "node[04-01]", "SLURM_JOB_ID": "1"}
    result = run_cli("experiment=regression", "device=ddp", "device.backend=gloo", f"output_root={tmp_path}", env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: SLURM_JOB_NODELIST='node[04-01]' is not a SLURM node list ([04-01] in 'node[04-01]': the range 04-01 "
        "runs backwards); expected e.g. node[01-04],other"]
    assert not (tmp_path / "runs").exists()


def _job_id_with_a_free_port() -> str:
    """A SLURM job id whose derived MASTER_PORT is free here."""
    for _ in range(200):
        job = random.randrange(1, slurm.PORT_SPAN)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm.port_of(str(job))))
            except OSError:
                continue
        return str(job)
    raise RuntimeError("no free port in 20000-39999")


BASE = ["experiment=regression", "trainer.progress=none", "optim=sgd", "optim.momentum=0.0", "optim.lr=0.05",
        "dataset.n_train=250", "trainer.max_epochs=2"]


@pytest.mark.slow  # three runs, two of them one gloo group: ~80 s on this 2-core machine
def test_two_srun_tasks_form_one_gloo_group_equal_to_one_process_at_twice_the_batch(tmp_path):
    """What srun gives each task (SLURM_PROCID, SLURM_NTASKS, SLURM_JOB_NODELIST, SLURM_JOB_ID; no
    RANK, no MASTER_ADDR): the two processes join one group, rank 0 writes the one run folder, and
    the weights are those of one process at batch 16 (as for runner's own spawner)."""
    job = _job_id_with_a_free_port()
    plain = {k: v for k, v in os.environ.items()
             if k not in slurm.LAUNCHER_KEYS and not k.startswith("SLURM_")}
    cmd = [sys.executable, "-m", "runner", *BASE, "device=ddp", "device.backend=gloo", "trainer.batch_size=8",
           f"output_root={tmp_path / 'two'}"]
    tasks = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**plain, "PYTHONUNBUFFERED": "1", "SLURM_JOB_ID": job, "SLURM_NTASKS": "2",
                                   "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r), "SLURM_JOB_NUM_NODES": "1",
                                   "SLURM_JOB_NODELIST": "127.0.0.[1-2]"})  # the first host: 127.0.0.1
             for r in range(2)]
    one = run_cli(*BASE, "device=cpu", "trainer.batch_size=16", f"output_root={tmp_path / 'one'}")
    outputs = [t.communicate(timeout=600) for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], [err[-2000:] for _, err in outputs]
    assert one.returncode == 0, one.stderr[-2000:]
    two_dir, one_dir = only_run_folder(tmp_path / "two"), only_run_folder(tmp_path / "one")
    summary = json.loads((two_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["device"].startswith("ddp x2") and summary["samples_seen"] == 500
    wa = torch.load(one_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(two_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6)
