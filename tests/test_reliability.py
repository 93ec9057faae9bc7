"""Reliability: unwritable output folders, non-finite losses, torn writes, out-of-memory advice."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import run_cli, run_in_process
from runner.runs.files import atomic_write_json, atomic_write_text


def test_unwritable_output_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_cli("experiment=regression", f"output_root={blocker}/sub")
    assert result.returncode == 2
    assert "cannot create the run folder" in result.stderr and "Traceback" not in result.stderr


def test_non_finite_loss_fails_the_run_and_names_the_step(tmp_path):
    code, run_dir = run_in_process(tmp_path, "experiment=regression", "trainer.progress=none", "optim=sgd",
                                   "optim.lr=1e12", "trainer.log_every_n_steps=1")
    assert code == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "non-finite training loss" in summary["error"] and "optimizer step" in summary["error"]


def test_skip_nonfinite_skips_and_counts(tmp_path):
    code, run_dir = run_in_process(tmp_path, "experiment=regression", "trainer.progress=none", "optim=sgd",
                                   "optim.lr=1e12", "trainer.skip_nonfinite=true")
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["skipped_steps"] > 0


def test_a_write_killed_midway_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"status": "running"})

    def torn(f):
        f.write(b'{"status": "compl')  # half of the new file, then the process "dies"
        raise KeyboardInterrupt

    from runner.runs import files
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, torn)
    assert json.loads(path.read_text()) == {"status": "running"}
    assert os.listdir(tmp_path) == ["summary.json"]  # no temporary file left behind
    atomic_write_text(path, '{"status": "completed"}')
    assert json.loads(path.read_text()) == {"status": "completed"}


def test_out_of_memory_message_suggests_accumulation():
    from runner.engine.run import runtime_message as _runtime_message

    message = _runtime_message(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert "trainer.accumulate_grad_batches" in message and "trainer.batch_size" in message


def test_cuda_graph_without_a_gpu_is_a_user_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from conftest import rejected

    code, error = rejected(tmp_path, "experiment=regression", "trainer.progress=none", "device=cpu",
                           "trainer.cuda_graph=true")
    assert code == 2 and "needs a CUDA device" in error


def test_first_sigint_asks_to_stop_and_a_second_exits_at_once():
    import signal

    from runner.engine.loop import SignalFlag

    with SignalFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT  # the loop finishes its step and checkpoints
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    with SignalFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM twice still means "stop after the step"
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_after_training_a_signal_stops_the_evaluation_at_once():
    """In the test evaluation there is no step to finish: SIGTERM raises at once, and one that came
    before the evaluation began (while the last job closed) stops the next at its start."""
    import signal

    from runner.engine.signals import SignalFlag
    from runner.errors import EXIT_SIGTERM, Interrupted

    with SignalFlag() as stop:
        with pytest.raises(Interrupted, match="^interrupted by SIGTERM during the test evaluation$") as caught:
            with stop.immediate("the test evaluation"):
                os.kill(os.getpid(), signal.SIGTERM)
                pytest.fail("the evaluation went on after SIGTERM")
        assert caught.value.exit_code == EXIT_SIGTERM
        with pytest.raises(Interrupted):
            with stop.immediate("the test evaluation"):
                pytest.fail("an evaluation started after the signal")
    with SignalFlag() as stop:
        with stop.immediate("the test evaluation"):
            pass  # no signal: nothing raised
        os.kill(os.getpid(), signal.SIGTERM)  # outside immediate(): only flagged
        assert stop.signum == signal.SIGTERM


def test_a_signal_while_the_best_checkpoint_is_read_is_an_interruption_not_a_damaged_file(tmp_path, monkeypatch):
    """SIGTERM lands inside torch.load of best.pt for the test evaluation: the run is recorded as
    interrupted during the test evaluation (exit 143, resume= evaluates again), not as a checkpoint
    that 'cannot be read' (the loader's own `except Exception` must not take the signal in)."""
    import signal

    import runner.engine.checkpoint as ckpt

    real_load = ckpt.torch.load

    def load(path, *args, **kwargs):
        if str(path).endswith("best.pt"):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, inside the load
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "load", load)
    code, run_dir = run_in_process(tmp_path, "experiment=regression", "trainer.progress=none", "trainer.max_epochs=2")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (code, summary["status"]) == (143, "interrupted")
    assert summary["error"] == "interrupted by SIGTERM during the test evaluation"
