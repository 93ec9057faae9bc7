"""Open configs: any torchvision / timm / user model, any torch optimizer and schedule, weights
from a local cache only, family compatibility checked before anything runs, presets whose parts
swap, and the Python API."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, compose, only_run_folder, rejected, run_cli, run_in_process
from runner.config import compat
from runner.config.build import checked_kwargs
from runner.errors import UserError

REGRESSION = ("experiment=regression", "trainer.progress=none", "device=cpu")


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow  # a ResNet-18 trained on the CPU; other torchvision models are built in the default run
# --- models ------------------------------------------------------------------------------------
def test_torchvision_resnet18_beats_the_prevalence_baseline(tmp_path):
    """The default multi-label experiment with model=torchvision model.name=resnet18."""
    code, run_dir = run_in_process(tmp_path, "model=torchvision", "model.name=resnet18", "trainer.progress=none",
                                   "device=cpu", "dataset.n_train=1000", "dataset.n_val=400", "dataset.n_test=400")
    assert code == 0
    metrics = summary(run_dir)["metrics"]
    # A prevalence-only guess scores the mean prevalence (about 0.25) as mAP.
    assert metrics["test/mAP"] > 0.6, metrics


def fake_resnet18_cache(torch_home, seed=0):
    """A resnet18 state dict written where torch.hub keeps torchvision's ImageNet file."""
    from torchvision.models import ResNet18_Weights, resnet18

    from runner.models.torchvision_models import cached_file

    torch.manual_seed(seed)
    reference = resnet18(weights=None)  # 1000 classes, like the real file
    path = cached_file(ResNet18_Weights.DEFAULT)
    assert str(path).startswith(str(torch_home))
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    return reference, path


def test_pretrained_weights_come_from_the_local_cache_only(tmp_path, monkeypatch):
    from runner.models.torchvision_models import build

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match=r"resnet18-f37072fd\.pth is not in the local cache.*load_state_dict_from_url"):
        build("resnet18", num_outputs=4, weights="DEFAULT")
    reference, path = fake_resnet18_cache(tmp_path)
    model = build("resnet18", num_outputs=4, weights="DEFAULT")
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert model.fc.out_features == 4  # a fresh head for the family's outputs
    with pytest.raises(UserError, match="is not a weights name of resnet18; allowed: null, IMAGENET1K_V1, DEFAULT"):
        build("resnet18", num_outputs=4, weights="IMAGENET1K_V9")
    with pytest.raises(UserError, match="is not a torchvision classification model"):
        build("resnet19", num_outputs=4)
    path.write_bytes(b"junk")
    with pytest.raises(UserError, match="is not a plain state dict"):
        build("resnet18", num_outputs=4, weights="DEFAULT")


@pytest.mark.slow  # saves and loads a torchvision weight file (~30 s)
def test_pretrained_weights_through_the_command_line(tmp_path, monkeypatch):
    torch_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    fake_resnet18_cache(torch_home)
    result = run_cli("model=torchvision", "model.name=resnet18", "model.weights=DEFAULT", "trainer.progress=none",
                     "device=cpu", "trainer.max_steps=2", "dataset.n_train=128", "dataset.n_val=64",
                     "dataset.n_test=64", f"output_root={tmp_path / 'out'}", env={"TORCH_HOME": str(torch_home)})
    assert result.returncode == 0, result.stderr
    missing = run_cli("model=torchvision", "model.name=resnet34", "model.weights=DEFAULT", "device=cpu",
                      f"output_root={tmp_path / 'out2'}", env={"TORCH_HOME": str(torch_home)})
    assert missing.returncode == 2
    lines = [line for line in missing.stderr.splitlines() + missing.stdout.splitlines() if line.strip()]
    assert any("resnet34-" in line and "not in the local cache" in line for line in lines), lines
    assert "Traceback" not in missing.stderr + missing.stdout


def test_timm_model_gets_the_familys_head():
    pytest.importorskip("timm")
    from runner.models.timm_models import build

    model = build("resnet18", num_outputs=4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(UserError, match="is not a timm model"):
        build("resnet19", num_outputs=4)


def test_a_user_module_with_kwargs_trains_from_its_own_config_dir(tmp_path, monkeypatch):
    """_target_ of the user's own module, found from --config-dir; keys its **kwargs take pass
    through, keys its signature names are still checked."""
    (tmp_path / "mynets.py").write_text(textwrap.dedent('''
        from torch import nn

        class TinyNet(nn.Module):
            def __init__(self, width: int = 8, **kwargs):
                super().__init__()
                self.kwargs = kwargs
                self.body = nn.Sequential(nn.Conv2d(3, width, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                          nn.Flatten(), nn.Linear(width, kwargs["num_classes"]))

            def forward(self, x):
                return self.body(x)
    '''))
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "tiny.yaml").write_text("_target_: mynets.TinyNet\nwidth: 8\nnum_classes: 4\n")
    common = ("--config-dir", str(tmp_path / "conf"), "model=tiny", "trainer.progress=none", "device=cpu",
              "trainer.max_epochs=1", "dataset.n_train=256", "dataset.n_val=64", "dataset.n_test=64")
    env = {"PYTHONPATH": str(tmp_path)}
    result = run_cli(*common, f"output_root={tmp_path / 'out'}", env=env)
    assert result.returncode == 0, result.stderr
    assert summary(only_run_folder(tmp_path / "out"))["status"] == "completed"
    # The refusals in process (runner.run, as the command line composes and runs; faster).
    from runner import run

    monkeypatch.syspath_prepend(str(tmp_path))
    for override, message in (("model.width=wide", "model.width='wide' has the wrong type: expected int"),
                              ("model.num_classes=3", "does not fit the 4 labels")):
        result = run([*common[2:], override, f"output_root={tmp_path / 'refused'}"], config_dir=str(tmp_path / "conf"))
        assert result["exit_code"] == 2 and message in result["error"], result["error"]


# --- optimizers and schedules -------------------------------------------------------------------
def test_any_torch_optimizer_and_schedule_run(tmp_path):
    code, run_dir = run_in_process(tmp_path / "radam", *REGRESSION, "optim._target_=torch.optim.RAdam", "optim.lr=0.01",
                                   "~optim.momentum", "~optim.nesterov")
    assert code == 0 and summary(run_dir)["status"] == "completed"
    code, run_dir = run_in_process(tmp_path / "onecycle", *REGRESSION, "schedule=one_cycle", "schedule.max_lr=0.1",
                                   "trainer.log_every_n_steps=1")
    assert code == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r["split"] == "train"]
    assert max(lrs) == pytest.approx(0.1, rel=0.05) and lrs[-1] < 0.01  # up to max_lr, then annealed


def test_no_weight_decay_on_biases_and_norm_weights():
    from runner.optim import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))
    node = compose("optim=adamw").optim
    decayed, kept = build_optimizer(node, model).param_groups
    assert decayed["weight_decay"] == 0.01 and kept["weight_decay"] == 0.0
    assert {p.ndim for p in decayed["params"]} == {2} and len(kept["params"]) == 4  # 2 biases + LayerNorm's 2
    node.decay_bias_and_norm = True
    assert len(build_optimizer(node, model).param_groups) == 1


def test_what_a_captured_step_cannot_follow_is_refused():
    from runner.optim import capture_arguments
    from runner.schedule import Schedule

    assert capture_arguments(torch.optim.Adam) == {"capturable": True, "fused": True}
    assert capture_arguments(torch.optim.SGD) == {"fused": True}
    with pytest.raises(UserError, match="LBFGS cannot be captured"):
        capture_arguments(torch.optim.LBFGS)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    one_cycle = OmegaConf.load(ROOT / "runner" / "conf" / "schedule" / "one_cycle.yaml")
    with pytest.raises(UserError, match="OneCycleLR cycles the momentum.*cycle_momentum=false"):
        Schedule(opt, one_cycle, steps_per_epoch=10, total_steps=100, captured=True)
    one_cycle.cycle_momentum = False
    Schedule(opt, one_cycle, steps_per_epoch=10, total_steps=100, captured=True)


def test_a_tensor_lr_is_filled_in_place():
    """The captured step reads the lr tensor it was captured with: the schedule must fill that
    very tensor, not replace it."""
    from runner.schedule import Schedule

    lr = torch.tensor(1.0)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr, capturable=False, foreach=False)
    schedule = Schedule(opt, OmegaConf.load(ROOT / "runner" / "conf" / "schedule" / "step.yaml"), steps_per_epoch=2,
                        total_steps=10)
    for _ in range(2):
        schedule.step_end()
    schedule.epoch_end()
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.1)


# --- compatibility ------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, needle", [
    (("model=vae1",), "model=vae1 does not fit the multilabel family (dataset=shapes); its model options: cifar_resnet, densenet121, small_cnn, timm, torchvision"),
    (("experiment=regression", "loss=focal"), "loss=focal does not fit the regression family (dataset=regression); its loss options: mse"),
    (("experiment=iwae_silhouettes", "model=densenet121"), "model=densenet121 does not fit the density family (dataset=silhouettes); its model options: vae1, vae2"),
    (("experiment=iwae_silhouettes", "loss=bce"), "loss=bce does not fit the density family"),
    (("experiment=char_lstm", "loss=iwae"), "its loss options: cross_entropy"),
    (("experiment=char_lstm", "model=mlp"), "model=mlp does not fit the charlm family"),
    (("experiment=regression", "model=char_lstm"), "model=char_lstm does not fit the regression family"),
    (("dataset=silhouettes",), "model=densenet121 does not fit the density family"),
])
def test_incompatible_pairs_exit_2_before_anything_runs(tmp_path, overrides, needle):
    code, error = rejected(tmp_path, *overrides, "trainer.progress=none", "device=cpu")
    assert code == 2 and needle in error and "\n" not in error, error
    assert not (tmp_path / "run").exists()  # a run rejected before it trained leaves no folder


def test_incompatible_pair_on_the_command_line_is_one_line(tmp_path):
    result = run_cli("model=vae1", "device=cpu", f"output_root={tmp_path}")
    assert result.returncode == 2
    text = (result.stdout + result.stderr).strip()
    assert text.count("\n") == 0 and "model=vae1 does not fit the multilabel family" in text, text


# --- presets whose parts swap -------------------------------------------------------------------
SUPPLIED = {  # what each family's code passes to the builders (not set by configs)
    "multilabel": {"model": {"num_outputs": 4}, "loss": {"pos_counts": [1], "num_samples": 2, "label_names": ["a"]}},
    "density": {"model": {"x_dim": 784, "train_mean": None}, "loss": {}},
    "charlm": {"model": {"vocab_size": 10}, "loss": {}},
    "regression": {"model": {"dim": 8}, "loss": {}},
    "classification": {"model": {"num_outputs": 10, "in_channels": 1},
                       "loss": {"class_counts": [5, 5], "class_names": ["a", "b"]}},
}


def fitting(group: str, family: str) -> list[str]:
    accepts = compat.module_of(family).ACCEPTS
    allowed = {"dataset": accepts.datasets, "model": accepts.models, "loss": accepts.losses}[group]
    return [name for name, target in compat.options(group).items() if target.startswith(allowed)]


def check_keys(cfg, family):
    checked_kwargs(cfg.dataset, "dataset", {"device": None, "num_workers": 0})
    checked_kwargs(cfg.model, "model", SUPPLIED[family]["model"])
    checked_kwargs(cfg.loss, "loss", SUPPLIED[family]["loss"])
    checked_kwargs(cfg.optim, "optim", {"params": None}, own_keys=("decay_bias_and_norm",))
    checked_kwargs(cfg.schedule, "schedule", {"optimizer": None}, own_keys=("interval", "warmup_steps"),
                   fill={"total_steps": 1, "T_max": 1})


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "runner" / "conf" / "experiment").glob("*.yaml")))
def test_each_preset_takes_every_compatible_dataset_and_model(experiment):
    family = compat.family_of_dataset(compose(f"experiment={experiment}").dataset)
    for dataset in fitting("dataset", family):
        for model in fitting("model", family):
            cfg = compose(f"experiment={experiment}", f"dataset={dataset}", f"model={model}", "device=cpu")
            check_keys(cfg, family)


def test_iwae_paper_on_the_silhouettes_composes():
    cfg = compose("experiment=iwae_paper", "dataset=caltech_silhouettes", "device=cpu")
    check_keys(cfg, "density")
    assert cfg.schedule._target_ == "runner.schedule.IWAEPaperLR" and cfg.loss.k == 50


def test_presets_that_differ_in_the_loss_inherit_one_base():
    base = OmegaConf.to_container(compose("experiment=focal_densenet", "device=cpu"), resolve=True)
    for name, loss in (("bce_densenet", "bce"), ("pos_weight_densenet", "bce_pos_weight"), ("asl_densenet", "asl")):
        other = OmegaConf.to_container(compose(f"experiment={name}", "device=cpu"), resolve=True)
        differs = {k for k in base if base[k] != other[k]}
        assert differs == {"loss", "name"}, (name, differs)
        assert other["loss"] == OmegaConf.to_container(OmegaConf.load(ROOT / "runner" / "conf" / "loss" / f"{loss}.yaml"))


# --- the Python API -----------------------------------------------------------------------------
def test_python_api_returns_the_summary(tmp_path):
    from runner import run

    result = run([*REGRESSION, f"output_root={tmp_path}"])
    assert result["status"] == "completed" and result["exit_code"] == 0
    assert result["metrics"]["test/loss"] > 0 and result["eval_samples"] == {"val": 64, "test": 64}
    run_dir = only_run_folder(tmp_path)
    assert result["run_dir"] == str(run_dir) and (run_dir / ".hydra" / "config.yaml").is_file()
    assert "run folder" in (run_dir / "run.log").read_text()
    bad = run([*REGRESSION, "model=vae1", f"output_root={tmp_path / 'bad'}"])
    assert bad["status"] == "failed" and bad["exit_code"] == 2 and "does not fit" in bad["error"]
    with pytest.raises(UserError, match="allowed keys of trainer"):
        run([*REGRESSION, "trainer.batch_sz=3"])
