"""What every logger shares: the run it logs (``RunInfo``), the interface (``Logger``) and the
small conversions from a metrics.jsonl row to what trackers take."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from runner.runs.files import atomic_write_json

POSITION = ("epoch", "step", "split")  # where a row sits, not what it measured
STATE_FILE = "loggers.json"  # the trackers' own run ids, so that resume= continues the same runs


@dataclass(frozen=True)
class JobInfo:
    """What the command line knows about a job and the engine does not: the job's own overrides
    (``loss=bce``) and, for a sweep job, the sweep folder."""

    overrides: tuple[str, ...] = ()
    sweep_dir: str | None = None

    @classmethod
    def of(cls, overrides: Sequence[str], sweep_dir: Any = None, resume: Any = None) -> "JobInfo":
        """A resumed run (``resume=<run>`` on the command line) keeps the overrides it started with."""
        saved = Path(str(resume)) / ".hydra" / "overrides.yaml" if resume else None
        if saved is not None and saved.is_file() and any(str(o).startswith("resume=") for o in overrides):
            overrides = [str(o) for o in OmegaConf.load(saved)]
        return cls(tuple(str(o) for o in overrides), str(Path(str(sweep_dir)).resolve()) if sweep_dir else None)


@dataclass(frozen=True)
class RunInfo:
    """Everything a logger knows about its run, passed explicitly (the Hydra config stops at the
    engine's entry)."""

    run_dir: Path
    output_root: Path
    name: str  # the experiment (preset) name: a tracker's experiment or project
    title: str  # this run's own name: the experiment plus its group overrides (focal_densenet-loss-bce)
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config
    overrides: tuple[str, ...] = ()
    sweep_dir: str | None = None
    resumed: bool = False
    tags: tuple[str, ...] = ()  # the config's top-level ``tags``: every tracker gets them

    @classmethod
    def of(cls, config: Any, run_dir: Path | None, choices: dict[str, str] | None,
           job: JobInfo | None) -> "RunInfo | None":
        """The run of a typed ``runner.config.Config``; None on processes that write nothing."""
        from runner.runs.names import unique_title

        if run_dir is None:
            return None
        job = job or JobInfo()
        resolved = OmegaConf.to_container(OmegaConf.structured(config), resolve=True, enum_to_str=True)
        # A sweep's job folder is named by its job number: two jobs titled alike get it added.
        title = unique_title(str(config.name), job.overrides, choices or {}, job.sweep_dir, Path(run_dir).name)
        return cls(run_dir=Path(run_dir), output_root=Path(config.output_root).resolve(), name=str(config.name),
                   title=title, config=resolved, overrides=job.overrides, sweep_dir=job.sweep_dir,
                   resumed=bool(config.resume), tags=tuple(str(t) for t in getattr(config, "tags", ()) or ()))

    def recall(self, key: str) -> Any:
        """A value a logger remembered in this run folder (its tracker's run id), or None."""
        path = self.run_dir / STATE_FILE
        return json.loads(path.read_text()).get(key) if path.is_file() else None

    def remember(self, key: str, value: Any) -> None:
        path = self.run_dir / STATE_FILE
        state = json.loads(path.read_text()) if path.is_file() else {}
        atomic_write_json(path, {**state, key: value})


class Logger:
    """One tracker of a run. The builder calls ``Class(run=RunInfo, **keys of its config node)``;
    the constructor only stores settings (it runs before the config is validated). Then, on the
    run's main process only:

    * ``start()`` once, when the run starts (summary.json says ``running``): open the tracker,
      record the config and ``run.tags``. An error here fails the run before any training.
    * ``identify(identity)`` once the model is built: the code, versions, GPU and parameter count.
    * ``log_row(row)`` for each metrics.jsonl row: ``epoch``, ``step`` (None for evaluation-only
      rows), ``split`` (train, val, test) and metrics; training metrics carry no prefix
      (``loss``), evaluation ones do (``val/loss``): ``metrics(row)`` names them all.
    * ``finish(summary, status)`` once at the end, whatever the status (completed, failed,
      interrupted), after the run's plots are drawn: summary.json's content as a dict.

    An error in ``log_row`` or ``finish`` is logged and that logger stops; the run goes on.
    """

    # (module to import, pyproject extra that installs it): a missing module exits 2 at start-up.
    requires: tuple[str, str] | None = None

    def __init__(self, run: RunInfo):
        self.run = run

    def start(self) -> None:
        pass

    def log_row(self, row: dict[str, Any]) -> None:
        pass

    def identify(self, identity: dict[str, Any]) -> None:
        """What ran (``runner.runs.identity.run_identity``: the git commit and dirty flag of runner's
        checkout and of the launch folder's, the Python / torch / CUDA versions, the GPU, the
        model's parameter count), once the model is built, after ``start``."""

    def finish(self, summary: dict[str, Any], status: str) -> None:
        pass


# --- conversions -----------------------------------------------------------------------------
def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def named(row: dict[str, Any]) -> dict[str, Any]:
    """The row's values by tracker name: training metrics get the ``train/`` prefix that
    evaluation metrics already carry. A tracker keeps one series per name, with no ``split``
    beside it, and its UI groups series by their prefix (TensorBoard's sections, MLflow's and
    W&B's panels): ``train/loss`` sits with ``train/lr``, apart from ``val/loss``. metrics.csv,
    which has a ``split`` column, keeps metrics.jsonl's own keys (``loss``)."""
    train = row.get("split") == "train"
    return {(f"train/{k}" if train and not k.startswith("train/") else k): v
            for k, v in row.items() if k not in POSITION}


def metrics(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers by tracker name (strings such as ``weights: best`` left out)."""
    return {k: float(v) for k, v in named(row).items() if is_number(v)}


def step_of(row: dict[str, Any]) -> int:
    return int(row.get("step") or 0)  # evaluation-only rows have no step


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """summary.json's final metrics that are numbers (NaN is stored there as a string)."""
    out = {}
    for key, value in summary.get("metrics", {}).items():
        if is_number(value):
            out[key] = float(value)
        elif isinstance(value, str) and value in ("nan", "inf", "-inf"):
            out[key] = float(value)
    return out


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"trainer": {"seed": 0}}`` -> ``{"trainer.seed": 0}``; lists become their JSON text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)):
            out[f"{prefix}{key}"] = json.dumps(value, default=str)
        else:
            out[f"{prefix}{key}"] = value
    return out


def plot_files(run_dir: Path) -> list[Path]:
    """The run's plots, drawn by the time ``finish`` is called."""
    return sorted((Path(run_dir) / "plots").glob("*.png"))
