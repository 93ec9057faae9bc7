"""Nothing reaches the network unless asked (model.download=true / dataset.download=true): pretrained
weights missing from the local caches stop the run with exit 2 at once, without one connection
attempt, for timm (Hugging Face cache) and torchvision (torch's hub cache); cached ones load
offline. The guard itself (tests/network_guard/, used by every test through conftest.py) is
checked here too, in this process and in a subprocess."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import NETWORK_GUARD, ROOT, run_cli
from runner.errors import UserError

import runner_network_guard

TIMM_MISSING = (r"model.weights=true: the pretrained weights of timm's resnet18 are not in the local Hugging Face "
                r"cache; fetch them once with: python -c \"import timm; timm.create_model\('resnet18', "
                r"pretrained=True\)\" \(or set model.download=true\)")


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches, for this process (huggingface_hub read HF_HOME when
    it was imported: its constant is set) and for subprocesses (the environment)."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path


def test_timm_weights_not_cached_exit_2_at_once_without_a_connection(empty_caches, network_attempts):
    pytest.importorskip("timm")
    from runner.models.timm_models import build

    started = time.perf_counter()
    with pytest.raises(UserError, match=TIMM_MISSING):
        build("resnet18", num_outputs=4, weights=True)
    assert time.perf_counter() - started < 5.0  # was 68 s of retried HEAD requests to the hub
    assert network_attempts == []


def test_timm_weights_come_from_the_local_caches(empty_caches, network_attempts):
    """A file in the Hugging Face cache's documented layout (models--<org>--<name>/refs/main ->
    snapshots/<commit>/), or in torch's hub cache for weights timm also knows by URL, is loaded
    offline; timm gives the model a fresh head."""
    timm = pytest.importorskip("timm")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from runner.models.timm_models import build

    torch.manual_seed(0)
    reference = timm.create_model("resnet18", pretrained=False)  # 1000 classes, like the real file
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_caches / "hf" / "hub" / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    safetensors_torch.save_file(reference.state_dict(), str(repo / "snapshots" / commit / "model.safetensors"))
    model = build("resnet18", num_outputs=4, weights=True)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert model.fc.out_features == 4
    # resnet18.tv_in1k: not in the Hugging Face cache, but its URL's file is in torch's hub cache
    other = timm.create_model("resnet18", pretrained=False)
    hub_file = empty_caches / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    hub_file.parent.mkdir(parents=True)
    torch.save(other.state_dict(), hub_file)
    model = build("resnet18.tv_in1k", num_outputs=3, weights=True)
    assert torch.equal(model.conv1.weight, other.conv1.weight) and model.fc.out_features == 3
    hub_file.write_bytes(b"junk")
    with pytest.raises(UserError, match="is not a plain state dict"):
        build("resnet18.tv_in1k", num_outputs=3, weights=True)
    assert network_attempts == []


def test_torchvision_weights_not_cached_exit_2_at_once_without_a_connection(empty_caches, network_attempts):
    from runner.models.torchvision_models import build

    started = time.perf_counter()
    with pytest.raises(UserError, match=r"resnet18-f37072fd\.pth is not in the local cache"):
        build("resnet18", num_outputs=4, weights="DEFAULT")
    assert time.perf_counter() - started < 5.0
    assert network_attempts == []


@pytest.mark.slow
def test_timm_weights_not_cached_on_the_command_line(empty_caches):
    """(~15-35 s on a 2-core CPU: the command's start and timm's import.) A fresh process (huggingface_hub imported with no HF_HUB_OFFLINE): exit 2 with the one message,
    and the guard in the subprocess saw no connection attempt (the fixture fails the test otherwise)."""
    pytest.importorskip("timm")
    result = run_cli("model=timm", "model.name=resnet18", "model.weights=true", "device=cpu",
                     f"output_root={empty_caches / 'out'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "the pretrained weights of timm's resnet18 are not in the local" in lines[0]
    log = Path(os.environ["RUNNER_TEST_NETWORK_LOG"])
    assert not log.exists() or log.read_text() == ""


# -- the guard itself (marked network: this test checks the attempts itself) ------------------

@pytest.mark.network
def test_the_guard_refuses_outbound_connections_and_lets_local_ones_through(tmp_path, monkeypatch):
    attempts: list[str] = []
    for (owner, name), replacement in runner_network_guard.guarded(attempts.append).items():
        monkeypatch.setattr(owner, name, replacement)
    with pytest.raises(runner_network_guard.NetworkBlocked):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with pytest.raises(runner_network_guard.NetworkBlocked):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("192.0.2.1", 80))  # TEST-NET-1
    assert len(attempts) == 2 and "huggingface.co" in attempts[0]
    server = socket.create_server(("127.0.0.1", 0))
    accepted = threading.Thread(target=lambda: server.accept()[0].close())
    accepted.start()
    socket.create_connection(server.getsockname(), timeout=5).close()  # loopback: allowed
    accepted.join(5)
    server.close()
    assert len(attempts) == 2
    log = tmp_path / "attempts.log"
    env = {**os.environ, "RUNNER_TEST_NETWORK_LOG": str(log), "PYTHONPATH": str(NETWORK_GUARD)}
    code = "import socket; socket.create_connection(('192.0.2.1', 80), timeout=1)"
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert child.returncode == 1 and "NetworkBlocked" in child.stderr
    assert "192.0.2.1" in log.read_text()
