"""``logger=wandb``: one Weights & Biases run per runner run, offline by default.

``mode: offline`` writes ``<dir>/wandb/offline-run-<time>-<id>/`` (``dir`` null: the run folder)
and needs no account or network; ``wandb sync <run>/wandb/offline-run-*`` uploads it later.
``mode: online`` logs live (after ``wandb login``). The run object that ``wandb.init`` returns is
used for everything (``reinit="create_new"``), never the ``wandb.log`` globals, so runs in one
process never mix.

Project: ``project``, null meaning the run's ``name`` (the preset); run name: its title; group:
the sweep folder's name for a sweep job; tags: the config's ``tags`` and the logger's own. Config:
the resolved config (plus ``runner.overrides``, ``runner.run_dir``, ``runner.sweep``, and what ran:
``runner.code`` with the git commits, ``runner.versions``, ``runner.gpu``, ``runner.parameters``). Metrics: every number of every row against ``step`` (the
optimizer step, not W&B's own counter, so a resumed run's repeated steps are accepted). At the
end: the final metrics, status and counts in the run's summary, and the plots as images.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Sequence

from runner.loggers.base import Logger, RunInfo, final_metrics, metrics, plot_files, step_of

EXIT_CODES = {"completed": 0, "failed": 1, "interrupted": 130}


class WandbLogger(Logger):
    requires = ("wandb", "wandb")

    def __init__(self, run: RunInfo, mode: str = "offline", project: str | None = None, entity: str | None = None,
                 dir: str | None = None, group: str | None = None, tags: Sequence[str] = (), images: bool = True):
        super().__init__(run)
        self.mode, self.project, self.entity, self.group = mode, project or run.name, entity, group
        self.dir = Path(dir) if dir else run.run_dir
        self.tags, self.images = list(tags), images
        self.wb: Any = None

    def start(self) -> None:
        import wandb

        # W&B ids are short lowercase alphanumerics; kept in the run folder so resume= continues it.
        run_id = (self.run.recall("wandb") if self.run.resumed else None) or uuid.uuid4().hex[:12]
        self.run.remember("wandb", run_id)
        sweep = self.run.sweep_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.runner = {"overrides": list(self.run.overrides), "sweep": sweep, "run_dir": str(self.run.run_dir)}
        self.wb = wandb.init(
            project=self.project, entity=self.entity, name=self.run.title, id=run_id, resume="allow",
            group=self.group or (Path(sweep).name if sweep else None),
            tags=list(dict.fromkeys([*self.tags, *self.run.tags])), dir=str(self.dir),
            mode=self.mode, reinit="create_new", config={**self.run.config, "runner": self.runner},
            # console="off": the terminal and run.log stay as runner writes them. disable_git: W&B's
            # own git probe sees the launch folder only; runner records both checkouts (identify).
            settings=wandb.Settings(console="off", silent=True, save_code=False, disable_git=True))
        self.wb.define_metric("step")
        self.wb.define_metric("*", step_metric="step")

    def identify(self, identity: dict[str, Any]) -> None:
        """What ran, in the config (``runner.code``: the git commit and dirty flag of runner's and the
        launch folder's checkout; ``runner.versions``, ``runner.gpu``, ``runner.parameters``, ...)."""
        self.runner = {**self.runner, **identity}
        self.wb.config.update({"runner": self.runner}, allow_val_change=True)

    def log_row(self, row: dict[str, Any]) -> None:
        self.wb.log({**metrics(row), "step": step_of(row)})

    def finish(self, summary: dict[str, Any], status: str) -> None:
        import wandb

        step = int(summary.get("steps") or 0)
        if self.images:
            pictures = {f"plots/{png.stem}": wandb.Image(str(png)) for png in plot_files(self.run.run_dir)}
            if pictures:
                self.wb.log({**pictures, "step": step})
        fields = {k: summary.get(k) for k in ("steps", "samples_seen", "wall_time_s", "throughput", "error")}
        self.wb.summary.update({**final_metrics(summary), **{k: v for k, v in fields.items() if v is not None},
                                "status": status})
        self.wb.finish(exit_code=EXIT_CODES.get(status, 1))
        self.wb = None
