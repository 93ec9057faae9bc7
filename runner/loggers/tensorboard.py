"""``logger=tensorboard``: ``<run>/tensorboard/``, for ``tensorboard --logdir outputs``.

Scalars: every number of every row at its step (``train/loss``, ``train/lr``, ``val/loss``,
``test/mAP``, ...). Text: the resolved config, the config's ``tags``, and what ran (``identity``: git
commits and dirty flags, versions, GPU, parameter count). HParams: the flattened config with the final
metrics, for the HParams dashboard's table across runs. Images: the run's plots at the end.
"""
from __future__ import annotations

from typing import Any

import yaml

from runner.loggers.base import Logger, RunInfo, final_metrics, flat, metrics, plot_files, step_of
from runner.runs.identity import describe


class TensorBoardLogger(Logger):
    requires = ("tensorboard", "tensorboard")

    def __init__(self, run: RunInfo, log_dir: str = "tensorboard", hparams: bool = True, images: bool = True):
        super().__init__(run)
        self.log_dir = run.run_dir / log_dir
        self.hparams, self.images = hparams, images
        self.writer: Any = None
        self.identity: dict[str, Any] | None = None  # what ran: written as text when the writer opens

    def open(self, first_step: int) -> Any:
        """The SummaryWriter, opened at the first row: a resumed run logs again the steps after its
        last checkpoint, so the interrupted run's events from that step on are hidden
        (``purge_step``) and TensorBoard shows each step once."""
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            resumed = self.log_dir.is_dir()
            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=first_step if resumed else None)
            if not resumed:
                config = yaml.safe_dump(self.run.config, sort_keys=False)
                # Markdown: an indented block keeps the YAML's layout in the Text dashboard.
                self.writer.add_text("config", "".join(f"    {line}\n" for line in config.splitlines()), 0)
                if self.run.tags:
                    self.writer.add_text("tags", ", ".join(self.run.tags), 0)
            if self.identity is not None:  # each start's own (a resumed run may run other code): at its first step
                self.writer.add_text("identity", markdown_table(describe(self.identity)), 0 if not resumed else first_step)
        return self.writer

    def identify(self, identity: dict[str, Any]) -> None:
        self.identity = identity  # written when the writer opens, at the first row: a resumed run's purge step is known then
        if self.writer is not None:
            self.writer.add_text("identity", markdown_table(describe(identity)), 0)

    def log_row(self, row: dict[str, Any]) -> None:
        step = step_of(row)
        writer = self.open(step)
        for name, value in metrics(row).items():
            writer.add_scalar(name, value, global_step=step)

    def finish(self, summary: dict[str, Any], status: str) -> None:
        step = int(summary.get("steps") or 0)
        writer = self.open(step)
        if self.hparams:
            self.write_hparams(writer, summary, status)
        if self.images:
            for png in plot_files(self.run.run_dir):
                writer.add_image(f"plots/{png.stem}", read_rgb(png), global_step=step, dataformats="HWC")
        writer.close()  # flushes the event file
        self.writer = None

    def write_hparams(self, writer: Any, summary: dict[str, Any], status: str) -> None:
        """The HParams dashboard's row of this run, written into the run's own event file (as
        Lightning does) so that it pairs with the scalars already there; ``add_hparams`` would
        open a second run folder instead."""
        from torch.utils.tensorboard.summary import hparams

        values = {k: v for k, v in flat(self.run.config).items() if isinstance(v, (int, float, str, bool))}
        values["status"] = status
        # Summary metrics only (val/mAP, test/loss): per-label ones (val/ap/<label>) would
        # drown the table.
        final = {k: v for k, v in final_metrics(summary).items() if k.count("/") == 1}
        file_writer = writer._get_file_writer()
        for proto in hparams(values, final):
            file_writer.add_summary(proto)


def markdown_table(values: dict[str, str]) -> str:
    return "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in values.items())


def read_rgb(png: Any) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(png) as image:
        return np.asarray(image.convert("RGB"))
