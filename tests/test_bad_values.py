"""Values that used to train on, fail at run time (exit 1) or fake a result, now refused where
they are read (issue 29): exit 2, one line naming the key, file or shapes and what is allowed,
no run folder left. README.md's "Bad input" table lists the same cases."""
from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose, run_cli
from runner import run
from runner.errors import UserError

FAST = ["experiment=regression", "device=cpu", "trainer.progress=none"]


def rejected(tmp_path, *overrides: str) -> str:
    """The one-line message of a job refused before it trained; checks exit 2 and no folder left."""
    try:
        result = run([*FAST, *overrides, f"output_root={tmp_path / 'out'}"])
    except UserError as e:  # refused while composing: the command line prints the same
        message = str(e)
    else:
        assert result["exit_code"] == 2 and result["status"] == "failed", result
        assert result["run_dir"] is None, "a run refused before training left its folder"
        message = result["error"]
    assert "\n" not in message and "Traceback" not in message, message
    return message


# (overrides, the message's telling part): each used to be accepted, or to fail with exit 1.
CATALOGUE = [
    # item 9: NaN slipped past `< 0`; -1 meant "never" or "no best.pt" silently
    (["trainer.gradient_clip_val=nan"], "trainer.gradient_clip_val=nan must be a finite number"),
    (["trainer.early_stopping.patience=-1"], "trainer.early_stopping.patience=-1 must be >= 0 (0: never stop early)"),
    (["trainer.save_top_k=-1"], "trainer.save_top_k=-1 must be >= 0"),
    (["trainer.early_stopping.min_delta=nan"], "trainer.early_stopping.min_delta=nan must be a finite number"),
    (["trainer.early_stopping.min_delta=-0.5"], "trainer.early_stopping.min_delta=-0.5 must be >= 0"),
    # item 16: exit 1 from deep inside torch, the key never named
    (["trainer.batch_size=99999999999999999999999"], "trainer.batch_size=99999999999999999999999 does not fit a "
                                                     "64-bit integer (allowed: -9223372036854775808 to "),
    (["trainer.seed=99999999999999999999999"], "trainer.seed=99999999999999999999999 does not fit a 64-bit integer"),
    (["device.index=99999999999999999999999"], "device.index=99999999999999999999999 does not fit a 64-bit integer"),
    (["optim=adam", "optim.betas=[0.9]"], "optim.betas=[0.9] must hold 2 values (tuple["),
    (["model.hidden=-3"], "model.hidden=-3 must be >= 1"),
    (["dataset.n_train=-5"], "dataset.n_train=-5 must be >= 0"),
    (["dataset.n_val=99999999999999999999999"], "dataset.n_val=99999999999999999999999 does not fit a 64-bit integer"),
    (["optim.lr=nan"], "optim.lr=nan must be a finite number"),
    (["optim.lr=inf"], "optim.lr=inf must be a finite number"),
    (["optim=adam", "optim.betas=[0.9,nan]"], "optim.betas=[0.9, nan] must be a finite number"),
    (["schedule=one_cycle", "schedule.max_lr=-inf"], "schedule.max_lr=-inf must be a finite number"),
    # item 17: "argument of type 'int' is not iterable"
    (["logger=[csv,123]"], "logger=[csv,123]: 123 is not an option of the 'logger' group; available options: csv, "
                           "mlflow, tensorboard, wandb"),
]


@pytest.mark.parametrize("overrides, needle", CATALOGUE, ids=[" ".join(o) for o, _ in CATALOGUE])
def test_bad_value_exits_2_naming_the_key(tmp_path, overrides, needle):
    message = rejected(tmp_path, *overrides)
    assert needle in message, message


def test_a_key_that_kwargs_pass_on_to_a_callee_without_it_is_an_unknown_key(tmp_path):
    """model=torchvision takes **kwargs for the torchvision builder; ResNet has no `width`."""
    message = rejected(tmp_path, "experiment=classify", "model=torchvision", "+model.width=8", "dataset.n_train=20",
                       "dataset.n_val=10", "dataset.n_test=10")
    assert message.startswith("unknown key 'model.width': ") and "unexpected keyword argument 'width'" in message


@pytest.mark.parametrize("root, needle", [("", "output_root='' is empty"),
                                          ("/", "output_root='/' is the filesystem root")])
def test_output_root_empty_or_the_filesystem_root_is_refused(root, needle):
    """Item 10: output_root='' wrote the run under /runs/ (and '/' does the same)."""
    with pytest.raises(UserError, match=needle):
        run([*FAST, f"output_root={root}"])


# --- item 6: the model's output fits the targets, in every family ----------------------------------
USER_MODELS = '''
import torch
from torch import nn

from runner.models.char_lstm import CharLSTM
from runner.models.vae import VAE


class Regressor(nn.Module):
    """`outputs` outputs; `flat` returns [B] instead of [B, 1]; `empty` adds a hidden layer of width 0."""

    def __init__(self, dim: int, outputs: int = 1, flat: bool = False, empty: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, 0), nn.Linear(0, outputs)) if empty else nn.Linear(dim, outputs)
        self.flat = flat

    def forward(self, x):
        y = self.body(x)
        return y[:, 0] if self.flat else y


class Classifier(nn.Module):
    def __init__(self, num_outputs: int, extra: int = 1, integer: bool = False):
        super().__init__()
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_outputs + extra))
        self.integer = integer

    def forward(self, x):
        y = self.head(x)
        return y.argmax(1, keepdim=True).expand_as(y) if self.integer else y


class TransposedVAE(VAE):
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        return {**out, "log_w": out["log_w"].T}


class TimeMajorLSTM(CharLSTM):
    def forward(self, x, state=None):
        logits, state = super().forward(x, state)
        return logits.transpose(1, 2), state
'''


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    (tmp_path / "usermodels.py").write_text(textwrap.dedent(USER_MODELS))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "usermodels"


REGRESSOR = ("model._target_=usermodels.Regressor", "~model.hidden", "~model.batchnorm")


@pytest.mark.parametrize("extra, got", [("+model.flat=true", "(2,)"), ("+model.outputs=3", "(2, 3)")])
def test_a_regression_output_that_broadcasts_against_the_targets_exits_2(tmp_path, user_models, extra, got):
    """[B] against [B, 1] targets was a [B, B] squared error (val/loss 9.9e13, exit 0)."""
    message = rejected(tmp_path, *REGRESSOR, extra)
    assert f"the model's output {got} does not fit the targets (expected (2, 1))" in message, message


def test_a_fitting_user_model_trains_and_an_empty_parameter_is_still_named(tmp_path, user_models):
    result = run([*FAST, *REGRESSOR, "trainer.max_epochs=1", f"output_root={tmp_path / 'ok'}"])
    assert result["exit_code"] == 0 and result["status"] == "completed"
    assert "the model has an empty parameter, body.0.weight of shape (0, 8)" in rejected(tmp_path, *REGRESSOR,
                                                                                          "+model.empty=true")


def _family_cases():
    """(family module, bundle, model node, loss node, the message's telling part) on tiny embedded data."""
    from runner.data import patterns, shapes, text
    from runner.data.binarized import silhouettes

    return {
        "classification": (patterns.build(n_train=4, n_val=2, n_test=2), {"_target_": "usermodels.Classifier"},
                           {"_target_": "runner.losses.classification.softmax_cross_entropy"},
                           "the model's output (2, 11) does not fit the 10 classes of the data (expected (2, 10))"),
        "classification-integer": (patterns.build(n_train=4, n_val=2, n_test=2),
                                   {"_target_": "usermodels.Classifier", "extra": 0, "integer": True},
                                   {"_target_": "runner.losses.classification.softmax_cross_entropy"},
                                   "the model's output (2, 10) of torch.int64 does not fit"),
        "multilabel": (shapes.build(n_train=4, n_val=2, n_test=2), {"_target_": "usermodels.Classifier", "extra": 2},
                       {"_target_": "runner.losses.multilabel.bce"},
                       "the model's output (2, 6) does not fit the 4 labels of the data (expected (2, 4))"),
        "density": (silhouettes(n_train=4, n_val=2, n_test=2), {"_target_": "usermodels.TransposedVAE"},
                    {"_target_": "runner.losses.iwae.IWAE", "k": 5},
                    "the model's output (2, 5) does not fit log_w of loss.k=5 samples per image (expected (5, 2))"),
        "charlm": (text.build_text(), {"_target_": "usermodels.TimeMajorLSTM", "hidden_size": 8, "num_layers": 1},
                   {"_target_": "runner.losses.charlm.TokenCrossEntropy"}, "does not fit the"),
    }


@pytest.mark.parametrize("case", ["classification", "classification-integer", "multilabel", "density", "charlm"])
def test_every_family_checks_the_output_on_the_first_training_samples(user_models, case):
    from runner.config.compat import module_of

    bundle, model, loss, needle = _family_cases()[case]
    with pytest.raises(UserError) as refused:
        module_of(bundle.family).build(bundle, OmegaConf.create(model), OmegaConf.create(loss))
    assert needle in str(refused.value), str(refused.value)
    if case == "charlm":  # logits [B, V, T] for targets [B, T]: both shapes named
        x, y = bundle.train[0]
        vocab = len(bundle.info["vocab"])
        assert f"{(y.shape[0], vocab, y.shape[1])} does not fit" in str(refused.value)
        assert f"(expected {(*y.shape, vocab)})" in str(refused.value)


def test_the_output_check_leaves_the_rng_and_batchnorm_statistics_as_they_were():
    """The check is one forward pass at build time: the run must then draw and normalise as it
    would without it (a family whose check draws, as density's binarisation does, on a BatchNorm model)."""
    from runner.families.first_batch import check_first_batch
    from runner.families.regression import RegressionFamily, mlp, synthetic

    class Drawing(RegressionFamily):
        def check_output(self, batch):
            torch.rand(3)
            super().check_output(batch)

    family = Drawing(mlp(dim=8, batchnorm=True))
    state = torch.get_rng_state()
    assert check_first_batch(family, synthetic(n_train=8)) is family
    assert torch.equal(torch.get_rng_state(), state), "the check drew from the run's RNG"
    batchnorm = family.model[1]
    assert torch.equal(batchnorm.running_mean, torch.zeros(16)) and int(batchnorm.num_batches_tracked) == 0
    assert family.model.training


# --- item 18: a sweep job refused for its NaN can be resumed ----------------------------------------
def test_same_value_takes_nan_for_nan():
    from runner.config import same_value

    nan = float("nan")
    assert same_value(nan, nan) and same_value([0.9, nan], [0.9, nan]) and same_value({"lr": nan}, {"lr": nan})
    assert not same_value(nan, 0.1) and not same_value([0.9, nan], [0.9]) and not same_value({"lr": 1}, {"b": 1})
    assert same_value(1, 1.0) and not same_value("a", "b")


def test_a_job_with_a_nan_override_resumes_with_its_own_config(tmp_path):
    """resume= of a sweep replays `optim.lr=nan`; the saved config holds nan too: not a change."""
    from runner.job import load_resumed_config

    cfg = compose(*FAST, "optim.lr=nan")
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    cfg.resume = str(tmp_path)
    resumed = load_resumed_config(cfg, [*FAST, "optim.lr=nan"])
    assert math.isnan(resumed.optim.lr)


# --- item 19: the report of a folder that is not a sweep ---------------------------------------------
def test_report_of_a_folder_that_is_neither_run_nor_sweep(tmp_path, capsys):
    from runner.report.table import main

    assert main([str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert "is neither a sweep folder" in err and "--group-by" not in err and out == ""
    assert not (tmp_path / "summary.csv").exists(), "the report wrote a summary.csv into a folder that is no sweep"
    (tmp_path / ".hydra").mkdir()
    assert main([str(tmp_path)]) == 2
    assert "is a run folder without summary.json" in capsys.readouterr().err
    (tmp_path / "summary.json").write_text(json.dumps({"status": "failed", "metrics": {"val/loss": 0.5}}))
    assert main([str(tmp_path)]) == 0 and "val/loss" in capsys.readouterr().out
    job = tmp_path / "sweep" / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- loss=bce\n")
    (job / "summary.json").write_text(json.dumps({"status": "completed", "metrics": {"val/loss": 0.5}}))
    assert main([str(tmp_path / "sweep"), "--group-by", "optim.lr"]) == 2
    assert "--group-by key 'optim.lr' is not an override of this sweep; its overrides: loss" in capsys.readouterr().err


# --- item 20: a rejected run leaves nothing, and says so on stderr ------------------------------------
@pytest.fixture(scope="module")
def rejected_on_the_command_line(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "fresh" / "out"
    return run_cli(*FAST, "trainer.batch_size=0", f"output_root={root}"), root


def test_a_rejected_run_leaves_no_folder_it_made(rejected_on_the_command_line):
    done, root = rejected_on_the_command_line
    assert done.returncode == 2, done.stderr
    assert not root.parent.exists(), f"left behind: {sorted(p for p in root.parent.rglob('*'))}"


def test_a_rejected_run_says_why_on_stderr_alone(rejected_on_the_command_line):
    done, _ = rejected_on_the_command_line
    assert done.stderr.strip() == "error: trainer.batch_size=0 must be > 0" and done.stdout == "", (done.stdout,
                                                                                                    done.stderr)
