"""Loggers (runner/loggers/): the config group takes several at once; each logger is read back
with its own tool's reader (pandas, TensorBoard's EventAccumulator, MLflow's client, the W&B
run file through W&B's own record type) and all find the run's final metric."""
from __future__ import annotations

import json
import logging
import struct
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, compose, run_cli, run_in_process
from runner.loggers import JobInfo, Logger, RunInfo
from runner.loggers.csv import CSVLogger

REGRESSION = ("experiment=regression", "trainer.progress=none", "device=cpu", "trainer.max_epochs=1")
ALL_FOUR = "logger=[csv,tensorboard,mlflow,wandb]"


def run_job_in_process(tmp_path: Path, *overrides: str, job: JobInfo | None = None) -> tuple[int, Path]:
    """A job in this process, as run_in_process, plus what the command line passes the loggers."""
    from omegaconf import OmegaConf, open_dict

    from runner.config import typed
    from runner.engine.run import run

    cfg = compose(*overrides, f"output_root={tmp_path / 'outputs'}", with_hydra=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run(typed(cfg), run_dir, choices, job=job), run_dir


# --- the config group --------------------------------------------------------------------------
@pytest.mark.parametrize("override, selected", [
    (None, ["csv"]),
    (ALL_FOUR, ["csv", "tensorboard", "mlflow", "wandb"]),
    ("logger=tensorboard", ["tensorboard"]),
    ("logger=[]", []),
])
def test_the_logger_group_selects_several_one_or_none(override, selected):
    from runner.config import typed

    cfg = compose("experiment=regression", *([override] if override else []))
    assert list(cfg.get("logger", {})) == selected
    config = typed(cfg)
    assert isinstance(config.logger, dict) and list(config.logger) == selected
    assert all(node["_target_"].startswith("runner.loggers.") for node in config.logger.values())


def test_an_unknown_logger_in_a_list_names_the_options():
    from runner.config.messages import describe

    with pytest.raises(Exception) as error:
        compose("logger=[csv,nope]")
    assert describe(error.value, ["logger=[csv,nope]"]).endswith(
        "available options in 'logger': csv, mlflow, tensorboard, wandb")


def test_a_missing_package_exits_2_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    from conftest import rejected

    code, error = rejected(tmp_path, *REGRESSION, "logger=[csv,mlflow]")
    assert code == 2 and error == "logger=mlflow needs mlflow: pip install 'runner[mlflow]'"
    assert not (tmp_path / "run").exists()  # stopped before anything ran: no folder left


def test_an_unknown_logger_key_exits_2(tmp_path):
    from conftest import rejected

    code, error = rejected(tmp_path, *REGRESSION, "+logger.csv.delimiter=tab")
    assert code == 2 and "unknown key 'logger.csv.delimiter'; allowed keys of logger.csv: filename" in error


# --- each logger against its own reader --------------------------------------------------------
def tensorboard_run(log_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    hparams = events.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(hparams[metadata.SESSION_START_INFO_TAG])
    experiment = metadata.parse_experiment_plugin_data(hparams[metadata.EXPERIMENT_TAG])
    return {
        "scalars": {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]},
        "hparams": {k: v.number_value if v.HasField("number_value") else v.string_value for k, v in start.hparams.items()},
        "hparam_metrics": {m.name.tag for m in experiment.metric_infos},
        "text": events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode(),
        "images": {tag: events.Images(tag)[-1] for tag in events.Tags()["images"]},
    }


def wandb_records(wandb_file: Path) -> list:
    """The records of an offline W&B run file, parsed with W&B's own protobuf ``Record``. The file
    is a LevelDB-style log (7-byte header ':W&B', 0xBEE1, version; 32 KiB blocks; each chunk with a
    crc32, a length and a type: full, first, middle, last); wandb ships no Python reader for it."""
    from wandb.proto import wandb_internal_pb2

    data = wandb_file.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    block, position, chunks, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        chunks += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # full, or the last chunk of a record
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


def wandb_run(run_dir: Path) -> dict:
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    records = wandb_records(next(folder.glob("run-*.wandb")))
    def items(updates):
        return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in updates}
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    summary: dict = {}
    config = items(run.config.update)
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            summary.update(items(record.summary.update))
        if record.WhichOneof("record_type") == "config":  # config.update() after init
            config.update(items(record.config.update))
    return {
        "run": run,
        "config": config,
        "history": [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"],
        "summary": summary,
        "exit_code": next(r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"),
        "media": sorted(p.name for p in (folder / "files" / "media" / "images").rglob("*.png")),
    }


def test_all_four_loggers_find_the_final_metric(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    sweep = tmp_path / "multirun" / "sweep-1"
    job = JobInfo(overrides=("experiment=regression", "optim=adam"), sweep_dir=str(sweep))
    code, run_dir = run_job_in_process(tmp_path, *REGRESSION, "optim=adam", ALL_FOUR, job=job)
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    final, steps = summary["metrics"]["test/loss"], summary["steps"]

    # csv: one row per log point, one column per metric
    table = pd.read_csv(run_dir / "metrics.csv")
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(table) == len(jsonl) and list(table["split"]) == [r["split"] for r in jsonl]
    assert set(table.columns) == {"epoch", "step", "split"} | {key for row in jsonl for key in row}  # the same keys
    assert table.loc[table["split"] == "train", "loss"].tolist() == [r["loss"] for r in jsonl if r["split"] == "train"]
    assert table.loc[table["split"] == "test", "test/loss"].item() == pytest.approx(final)
    assert table.loc[table["split"] == "train", "val/loss"].isna().all()

    # tensorboard: scalars, hparams with the final metrics, the config as text, the plots as images
    tb = tensorboard_run(run_dir / "tensorboard")
    assert tb["scalars"]["test/loss"][steps] == pytest.approx(final, rel=1e-6)
    assert len(tb["scalars"]["train/loss"]) == (table["split"] == "train").sum()
    assert tb["hparams"]["optim._target_"] == "torch.optim.Adam" and tb["hparams"]["status"] == "completed"
    assert tb["hparams"]["trainer.batch_size"] == 16
    assert {"test/loss", "val/loss"} <= tb["hparam_metrics"]
    assert "_target_: torch.optim.Adam" in tb["text"]
    assert tb["images"]["plots/curves"].width > 0

    # mlflow: experiment = the preset, run = the title, metrics per step, params, artifacts, tags
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("regression")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "regression-optim-adam" and run.info.status == "FINISHED"
    assert run.data.metrics["test/loss"] == pytest.approx(final)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == \
        list(table.loc[table["split"] == "train", "step"])
    assert run.data.params["optim._target_"] == "torch.optim.Adam" and run.data.params["trainer.batch_size"] == "16"
    assert run.data.tags["sweep"] == str(sweep) and run.data.tags["overrides"] == "experiment=regression optim=adam"
    assert run.data.tags["status"] == "completed"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.jsonl", "metrics.csv", "plots"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/curves.png"]
    assert not any(a.startswith("checkpoints") for a in artifacts)

    # wandb (offline): config, metrics against the step, the final summary, the plots
    wb = wandb_run(run_dir)
    assert wb["run"].display_name == "regression-optim-adam" and wb["run"].project == "regression"
    assert wb["run"].run_group == "sweep-1" and wb["exit_code"] == 0
    assert wb["config"]["optim"]["_target_"] == "torch.optim.Adam"
    assert wb["config"]["runner"]["overrides"] == ["experiment=regression", "optim=adam"]
    assert wb["config"]["runner"]["code"]["runner"]["commit"] == git("rev-parse", "HEAD")  # what ran
    assert wb["config"]["runner"]["parameters"] == summary["parameters"] > 0
    test_rows = [row for row in wb["history"] if "test/loss" in row]
    assert [row["step"] for row in test_rows] == [steps] and test_rows[0]["test/loss"] == pytest.approx(final)
    assert wb["summary"]["test/loss"] == pytest.approx(final) and wb["summary"]["status"] == "completed"
    assert len(wb["media"]) == 1 and wb["media"][0].startswith("curves")


def git(*args: str) -> str:
    import subprocess

    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_a_seed_sweep_shares_one_mlflow_experiment_with_distinct_names_tags_and_the_commit(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient

    result = run_cli("-m", *REGRESSION, "trainer.seed=0,1", "tags=[seed_sweep,baseline]", "logger=[mlflow,tensorboard]",
                     f"output_root={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "regression-max_epochs1-seed1: final metrics" in result.stdout
    assert "mlflow" not in result.stderr.lower()  # the terminal gets warnings only
    (sweep,) = (tmp_path / "multirun").iterdir()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.sweep = '{sweep}'")
    assert experiment.name == "regression"
    assert sorted(r.info.run_name for r in runs) == ["regression-max_epochs1-seed0", "regression-max_epochs1-seed1"]
    assert {r.data.params["trainer.seed"] for r in runs} == {"0", "1"}
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id, ".hydra")] == [".hydra/config.yaml"]
    # the config's tags, and the code that ran, as git itself reads this checkout
    commit, dirty = git("rev-parse", "HEAD"), str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower()
    tagged = client.search_runs([experiment.experiment_id], filter_string="tags.seed_sweep = 'true'")
    assert len(tagged) == 2
    for run in runs:
        tags = run.data.tags
        assert tags["tags"] == "seed_sweep, baseline" and tags["baseline"] == "true"
        assert tags["git.runner.commit"] == commit and tags["git.runner.dirty"] == dirty
        assert tags["mlflow.source.git.commit"] == commit  # the launch folder is this checkout too
        assert tags["version.torch"] == __import__("torch").__version__ and tags["gpu"] == "None"
        job_dir = Path(tags["run_dir"])
        weights = __import__("torch").load(job_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
        assert tags["parameters"] == str(sum(t.numel() for t in weights.values()))
        tb = tensorboard_text(job_dir / "tensorboard")
        assert tb["tags"] == "seed_sweep, baseline" and f"| git.runner.commit | {commit} |" in tb["identity"]


def tensorboard_text(log_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    return {tag.removesuffix("/text_summary"): events.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
            for tag in events.Tags()["tensors"] if tag.endswith("/text_summary")}


def test_mlflow_and_wandb_continue_their_run_on_resume(tmp_path):
    """resume=: the same MLflow run (a param added, none changed) and the same W&B run id."""
    pytest.importorskip("mlflow")
    from runner.loggers.mlflow import MLflowLogger

    info = RunInfo(run_dir=tmp_path, output_root=tmp_path, name="exp", title="exp-loss-bce",
                   config={"optim": {"lr": 0.1}, "trainer": {"seed": 0}})
    first = MLflowLogger(info)
    first.start()
    first.log_row({"epoch": 0, "step": 4, "split": "train", "loss": 1.0})
    first.finish({"steps": 4}, "interrupted")
    resumed_info = RunInfo(**{**info.__dict__, "config": {**info.config, "note": "new"}, "resumed": True})
    again = MLflowLogger(resumed_info)
    again.start()
    again.log_row({"epoch": 0, "step": 8, "split": "train", "loss": 0.5})
    again.finish({"steps": 8}, "completed")
    assert again.run_id == first.run_id
    run = again.client.get_run(again.run_id)
    assert run.info.status == "FINISHED" and run.data.params["note"] == "new" and run.data.params["optim.lr"] == "0.1"
    assert [m.step for m in again.client.get_metric_history(again.run_id, "train/loss")] == [4, 8]
    assert json.loads((tmp_path / "loggers.json").read_text())["mlflow"]["run_id"] == first.run_id

    pytest.importorskip("wandb")
    from runner.loggers.wandb import WandbLogger

    for run_info in (info, resumed_info):
        logger = WandbLogger(run_info)
        logger.start()
        logger.finish({"steps": 8}, "completed")
        # W&B names an offline folder by the second it started and the run id (the same on resume):
        # two starts within one second share a folder and its run file, which CI once found
        # holding no run record.
        time.sleep(1.05)
    run_ids = {next(r.run.run_id for r in wandb_records(f) if r.WhichOneof("record_type") == "run")
               for f in tmp_path.glob("wandb/offline-run-*/run-*.wandb")}  # one folder per start
    assert run_ids == {json.loads((tmp_path / "loggers.json").read_text())["wandb"]}


# --- csv ---------------------------------------------------------------------------------------
def test_csv_grows_a_column_per_new_metric_and_starts_from_the_kept_rows(tmp_path):
    info = RunInfo(run_dir=tmp_path, output_root=tmp_path, name="n", title="n")
    rows = [{"epoch": 0, "step": 4, "split": "train", "loss": 2.0, "lr": 0.1},
            {"epoch": 0, "step": 4, "split": "val", "val/loss": 1.5},
            {"epoch": 0, "step": 8, "split": "train", "loss": 1.0, "lr": 0.1},
            {"epoch": 0, "step": 8, "split": "test", "test/loss": 1.2, "weights": "best"}]
    logger = CSVLogger(info)
    logger.start()
    for row in rows:
        logger.log_row(row)
    table = pd.read_csv(tmp_path / "metrics.csv")
    assert list(table.columns) == ["epoch", "step", "split", "loss", "lr", "val/loss", "test/loss", "weights"]  # as logged
    assert list(table["loss"].fillna(-1)) == [2.0, -1, 1.0, -1] and table["test/loss"].iloc[3] == 1.2
    assert not list(tmp_path.glob(".metrics.csv.*"))  # rewritten atomically: no temporary left
    # a resumed run: the engine kept metrics.jsonl's rows up to its checkpoint; the CSV follows
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    resumed = CSVLogger(info)
    resumed.start()
    resumed.log_row({"epoch": 0, "step": 8, "split": "train", "loss": 0.9, "lr": 0.1})
    assert list(pd.read_csv(tmp_path / "metrics.csv")["loss"].fillna(-1)) == [2.0, -1, 0.9]


# --- failures ----------------------------------------------------------------------------------
class BrokenLogger(Logger):
    """A tracker that loses its connection at the first row."""

    def log_row(self, row):
        raise ConnectionError("tracker went away")


class UnreachableLogger(Logger):
    def start(self):
        raise ConnectionError("no tracking server at http://nowhere:5000")


def test_a_logger_failing_mid_run_is_dropped_and_the_run_completes(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="runner"):
        code, run_dir = run_in_process(tmp_path, *REGRESSION, "+logger.broken._target_=test_loggers.BrokenLogger")
    assert code == 0
    warned = [r for r in caplog.records if "logger=broken could not log a row" in r.getMessage()]
    assert len(warned) == 1 and "tracker went away" in warned[0].getMessage()
    assert len(pd.read_csv(run_dir / "metrics.csv")) == len((run_dir / "metrics.jsonl").read_text().splitlines())


def test_a_logger_that_cannot_start_fails_the_run_before_training(tmp_path):
    code, run_dir = run_in_process(tmp_path, *REGRESSION, "+logger.remote._target_=test_loggers.UnreachableLogger")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert code == 1 and summary["status"] == "failed" and summary["steps"] == 0
    assert "no tracking server" in summary["error"]
