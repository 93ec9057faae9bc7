"""``logger=mlflow``: one MLflow run per runner run, through MLflow's own client (``MlflowClient``:
no active-run global state, so runs in one process never mix).

* Store: ``tracking_uri`` (a server ``http://host:5000``, ``databricks``, ``sqlite:///...``);
  null means ``$MLFLOW_TRACKING_URI`` where set, else ``sqlite:///<output_root>/mlflow.db``
  with artifacts in ``<output_root>/mlartifacts``, which
  ``mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db`` opens. (MLflow 3 refuses the old
  ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE=true``; SQLite is its own local default.)
* Experiment: ``experiment``, null meaning the run's ``name`` (the preset), so a sweep's jobs
  land in one experiment; each run is named by its title (``focal_densenet-loss-bce``) and
  tagged with its folder, its overrides and, for a sweep job, the sweep folder (``sweep``); the
  config's ``tags`` each as a tag ``<tag>: true`` (and ``tags``: the list); what ran (git commit
  and dirty flag of runner's and the launch folder's checkout, versions, GPU, parameter count:
  ``git.runner.commit``, ``git.cwd.dirty``, ``version.torch``, ``parameters``, ...).
* Params: the flattened resolved config (``trainer.batch_size``, ``optim.lr``, ...), so runs
  compare on every setting, not only on the ones a command line named.
* Metrics: every number of every row at its step; at the end the run's files (``artifacts``,
  glob patterns in the run folder; checkpoints only if listed) and its status.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from runner.errors import UserError
from runner.loggers.base import Logger, RunInfo, flat, metrics, step_of
from runner.runs.identity import describe

ARTIFACTS = ("summary.json", "metrics.jsonl", "metrics.csv", "per_class.csv", "samples.txt", "plots/*.png",
             ".hydra/config.yaml")
STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
# MLflow's limits per log_batch call and per value (mlflow/utils/validation.py).
PARAMS_PER_BATCH, METRICS_PER_BATCH, PARAM_LENGTH, TAG_LENGTH = 100, 1000, 6000, 8000
UNSAFE_KEY = re.compile(r"[^\w./\- :]")  # MLflow's allowed characters in a metric or param name


def safe_key(name: str) -> str:
    return UNSAFE_KEY.sub("_", name).replace("..", "_")


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Parallel sweep jobs open the same SQLite store: one at a time creates its tables and the
    experiment, which MLflow does not guard against."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # the lock goes with the descriptor


class MLflowLogger(Logger):
    requires = ("mlflow", "mlflow")

    def __init__(self, run: RunInfo, tracking_uri: str | None = None, experiment: str | None = None,
                 artifacts: Sequence[str] = ARTIFACTS, tags: dict | None = None):
        super().__init__(run)
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")  # MLflow's own variable
        self.default_store = not tracking_uri
        self.tracking_uri = tracking_uri or f"sqlite:///{run.output_root / 'mlflow.db'}"
        self.experiment = experiment or run.name
        self.artifacts = list(artifacts)
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.client: Any = None
        self.run_id: str | None = None

    def start(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            with exclusive(self.run.output_root / "mlflow.db.lock") if self.default_store else contextlib.nullcontext():
                self.client = self.connect()
                experiment_id = self.experiment_id()
        except MlflowException as e:
            raise UserError(f"logger.mlflow.tracking_uri={self.tracking_uri}: {str(e).splitlines()[0]}") from None
        self.run_id = self.resumed_run()
        logged: set[str] = set()
        if self.run_id is None:
            self.run_id = self.client.create_run(experiment_id, run_name=self.run.title, tags=self.run_tags()).info.run_id
            self.run.remember("mlflow", {"tracking_uri": self.tracking_uri, "run_id": self.run_id})
        else:  # params cannot change in MLflow: a resumed run adds only the ones it did not log
            logged = set(self.client.get_run(self.run_id).data.params)
        self.log_params({k: v for k, v in flat(self.run.config).items() if safe_key(k) not in logged})

    def connect(self) -> Any:
        from mlflow.tracking import MlflowClient

        # MLflow announces creating a new store's tables at INFO on its own terminal handler;
        # runner's terminal gets warnings only (run.log keeps the rest).
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        return MlflowClient(tracking_uri=self.tracking_uri)

    def experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        location = (self.run.output_root / "mlartifacts" / self.experiment).as_uri() if self.default_store else None
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location)
        except MlflowException:  # created meanwhile by another process of the sweep
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def resumed_run(self) -> str | None:
        """resume=: the MLflow run this run folder started, when it is in this store."""
        from mlflow.exceptions import MlflowException

        known = self.run.recall("mlflow") if self.run.resumed else None
        if not known or known.get("tracking_uri") != self.tracking_uri:
            return None
        try:
            self.client.update_run(known["run_id"], status="RUNNING")
        except MlflowException:  # deleted from the store meanwhile: a new run
            return None
        return known["run_id"]

    def run_tags(self) -> dict[str, str]:
        tags = {"run_dir": str(self.run.run_dir), "overrides": " ".join(self.run.overrides), **self.tags}
        if self.run.sweep_dir:
            tags["sweep"] = self.run.sweep_dir
        if self.run.tags:  # the config's top-level tags: each its own key (search tags.`<tag>` = 'true'), and the list
            tags.update({safe_key(t): "true" for t in self.run.tags}, tags=", ".join(self.run.tags))
        return {k: v[:TAG_LENGTH] for k, v in tags.items()}

    def identify(self, identity: dict[str, Any]) -> None:
        """What ran, as tags (they may change on resume, params may not); the launch folder's
        commit (else runner's) also as MLflow's own ``mlflow.source.git.commit``, which its UI shows."""
        from mlflow.entities import RunTag

        tags = describe(identity)
        code = identity.get("code") or {}
        source = code.get("cwd") or code.get("runner")
        if source:
            tags["mlflow.source.git.commit"] = source["commit"]
        batch = [RunTag(safe_key(k), str(v)[:TAG_LENGTH]) for k, v in tags.items()]
        self.client.log_batch(self.run_id, tags=batch)

    def log_params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(safe_key(k), str(v)[:PARAM_LENGTH]) for k, v in values.items()]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + PARAMS_PER_BATCH])

    def log_row(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), step_of(row)
        batch = [Metric(safe_key(k), v, now, step) for k, v in metrics(row).items()]
        for i in range(0, len(batch), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i:i + METRICS_PER_BATCH])

    def finish(self, summary: dict[str, Any], status: str) -> None:
        for pattern in self.artifacts:
            for path in sorted(self.run.run_dir.glob(pattern)):
                if path.is_file():
                    folder = path.parent.relative_to(self.run.run_dir).as_posix()
                    self.client.log_artifact(self.run_id, str(path), artifact_path=None if folder == "." else folder)
        tags = {"status": status, "steps": str(summary.get("steps"))}
        if summary.get("error"):
            tags["error"] = str(summary["error"])[:TAG_LENGTH]
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        self.client.set_terminated(self.run_id, status=STATUS.get(status, "FAILED"))
