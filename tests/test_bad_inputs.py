"""The catalogue of bad inputs: each exits 2 with one message that names what is wrong and what
is allowed, no traceback, and touches no run. README.md's "Bad input" table lists the same cases."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from conftest import run_cli
from runner import run
from runner.errors import UserError

FAST = ["experiment=regression", "device=cpu", "trainer.progress=none"]

# (overrides, the message's telling part): engine-level checks, exit code 2 from the run itself.
CATALOGUE = [
    (["device=ddp", "device.devices=0"], "device.devices=0 means one process per GPU, but no GPU is visible"),
    (["device=ddp", "device.devices=-1"], "device.devices=-1 must be >= 0"),
    (["device.sync_batchnorm=true"], "device.sync_batchnorm=true synchronises BatchNorm across GPU processes"),
    (["dataset.n_train=0"], "the train split of dataset 'runner.families.regression.synthetic' is empty"),
    (["trainer.num_workers=-1"], "trainer.num_workers=-1 must be >= 0"),
    (["optim.momentum=-5"], "optim SGD: Invalid momentum value: -5"),
    (["trainer.seed=${oc.env:HOME}"], "trainer.seed: While dereferencing interpolation"),
    (["trainer.monitor=val/acc"], "trainer.monitor=val/acc is not a metric of this run's validation; it produces: val/loss"),
    (["trainer.val_every_n_steps=-1"], "trainer.val_every_n_steps=-1 must be >= 0"),
    (["trainer.ckpt_every_n_steps=-2"], "trainer.ckpt_every_n_steps=-2 must be >= 0"),
    (["trainer.ckpt_every_n_epochs=0"], "trainer.ckpt_every_n_epochs=0 must be > 0"),
    (["trainer.limit_train_batches=0"], "trainer.limit_train_batches=0 must be a number of batches"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 must be > 0, or -1 for no limit"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0 must be > 0"),
    (["trainer.batch_size=0"], "trainer.batch_size=0 must be > 0"),
    (["trainer.precision=8"], "trainer.precision='8' is not known; allowed: 32, tf32, bf16, 16"),
    (["trainer.steps_per_graph=4"], "trainer.steps_per_graph=4 needs trainer.cuda_graph=true"),
    (["trainer.cuda_graph=true"], "trainer.cuda_graph needs a CUDA device"),
    (["trainer.compile_mode=fast"], "trainer.compile_mode='fast' is not known; allowed: default, "
                                    "max-autotune-no-cudagraphs, max-autotune, reduce-overhead"),
    (["trainer.compile_mode=max-autotune-no-cudagraphs"], "trainer.compile_mode=max-autotune-no-cudagraphs is the "
                                                          "mode of torch.compile: it needs trainer.compile=true"),
    (["trainer.compile=true", "trainer.compile_mode=reduce-overhead", "trainer.cuda_graph=true"],
     "trainer.compile_mode=reduce-overhead captures CUDA graphs of its own"),
    (["+trainer.batch_sz=8"], "unknown key 'trainer.batch_sz' (did you mean 'batch_size'?); allowed keys of trainer: "
                              "accumulate_grad_batches"),
    (["+model.width=8"], "unknown key 'model.width'; allowed keys of model: batchnorm, hidden"),
    (["model.hidden=0"], "model.hidden=0 must be >= 1"),
    (["model=vae1"], "model=vae1 does not fit the regression family"),
    (["optim._target_=torch.optim.Nope"], "_target_ 'torch.optim.Nope' cannot be imported"),
    (["schedule.interval=batch"], "schedule.interval='batch' is not known; allowed: step, epoch"),
    (["mode=eval"], "mode=eval needs ckpt_path="),
    (["ckpt_path=/nonexistent.pt"], "ckpt_path=/nonexistent.pt: no such file"),
]


@pytest.mark.parametrize("overrides, needle", CATALOGUE, ids=[" ".join(o) for o, _ in CATALOGUE])
def test_bad_input_exits_2_with_one_line(tmp_path, overrides, needle):
    try:
        result = run([*FAST, *overrides, f"output_root={tmp_path}"])
    except UserError as e:  # caught while composing: the command line prints the same
        message = str(e)
    else:
        assert result["exit_code"] == 2 and result["status"] == "failed", result
        message = result["error"]
    runs = list((tmp_path / "runs").glob("*")) if (tmp_path / "runs").exists() else []
    assert all(json.loads((run / "summary.json").read_text())["steps"] > 0 for run in runs), \
        "a run rejected before training left its folder"
    assert needle in message and "\n" not in message and "Traceback" not in message, message


@pytest.mark.parametrize("args, needle", [
    (["trainer.foo=1"], "allowed keys of trainer: accumulate_grad_batches"),
    (["loss=nope"], "unknown option loss=nope; available options in 'loss': asl, bce"),
    (["optim=rmsprop"], "unknown option optim=rmsprop; available options in 'optim': adam, adamw, sgd"),
    (["trainer.batch_size=abc"], "trainer.batch_size"),
])
def test_composition_errors_do_not_depend_on_hydra_full_error(tmp_path, args, needle):
    for setting in ("0", "1"):
        done = run_cli(*FAST, *args, f"output_root={tmp_path}", env={"HYDRA_FULL_ERROR": setting})
        assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_resume_folder_with_a_broken_config_exits_2(tmp_path):
    trained = run([*FAST, "trainer.max_epochs=1", f"output_root={tmp_path}"])  # in process: faster
    assert trained["exit_code"] == 0
    run_dir = Path(trained["run_dir"])
    (run_dir / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    for text, needle in (("", "is empty or not a runner config"), ("a: [unclosed", "is not a readable config")):
        (run_dir / ".hydra" / "config.yaml").write_text(text)
        done = run_cli(f"resume={run_dir}")
        assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_failing_disk_ends_with_one_line_naming_the_path(tmp_path, monkeypatch):
    """ENOSPC while writing a checkpoint: exit 1, the path named, summary.json not left running."""
    import errno

    from runner.engine import checkpoint

    def full(path, payload):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "save_checkpoint", full)
    result = run([*FAST, f"output_root={tmp_path}"])
    assert result["exit_code"] == 1 and result["status"] == "failed"
    assert result["error"].startswith("OSError: No space left on device: ") and "checkpoints/best.pt" in result["error"]


def test_data_errors_name_the_file_and_line(tmp_path):
    from runner.data import idx, multilabel_csv
    from runner.data.binarized import caltech_silhouettes

    truncated = tmp_path / "train-images-idx3-ubyte.gz"
    truncated.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + bytes(100))[:30])
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte\.gz (cannot be read \(truncated|is truncated)"):
        idx.read_idx(truncated)
    folder = tmp_path / "caltech"
    folder.mkdir()
    (folder / "caltech101_silhouettes_28_split1.mat").write_text("not a mat file")
    with pytest.raises(UserError, match=r"caltech101_silhouettes_28_split1\.mat is not a MATLAB \.mat file"):
        caltech_silhouettes(root=str(folder))
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(b"")
    (tmp_path / "labels.csv").write_text("path,cat,dog\n0.png,0,1\n1.png,1,0\n2.png,abc,1\n")
    with pytest.raises(UserError, match=r"labels\.csv, line 4: label 'cat' is 'abc'; labels must be 0 or 1"):
        multilabel_csv.build(csv=str(tmp_path / "labels.csv"), image_dir=str(images), image_size=32)
    (tmp_path / "dup.csv").write_text("path,split,cat,cat\n0.png,train,0,1\n")
    with pytest.raises(UserError, match=r"dup\.csv, line 1: column 'cat' appears more than once"):
        multilabel_csv.build(csv=str(tmp_path / "dup.csv"), image_dir=str(images), split_column="split")
