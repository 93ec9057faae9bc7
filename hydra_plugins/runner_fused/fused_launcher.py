"""``hydra/launcher=fused``: a sweep's jobs that share their shapes train as one batched model in
this process (runner/engine/fused.py); the others run one after another, as Hydra's basic
launcher runs them. Every job keeps its own run folder, written as a run alone writes it.

Hydra finds launchers in the ``hydra_plugins`` package only; the work is runner's own
(runner/job.py prepares each job, runner/engine/fused.py groups and trains them).
"""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict


@contextlib.contextmanager
def logging_to(run_dirs: Sequence[Path]) -> Iterator[None]:
    """The log of what runs now goes to each of these jobs' run.log (a fused group's log is
    every member's)."""
    from runner.api import logging_to as one_log

    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)  # the last prepared job's, set by Hydra
        handler.close()
    with contextlib.ExitStack() as stack:
        for run_dir in run_dirs:
            stack.enter_context(one_log(Path(run_dir) / "run.log"))
        yield


class FusedLauncher(Launcher):
    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    @staticmethod
    def prepare(cfg: DictConfig) -> Any:
        """Hydra's job body here: the job made ready (runner.job.Job), None where it completed in
        an earlier run of this sweep, or exit code 2 for a bad config."""
        from runner.errors import EXIT_USER_ERROR, UserError
        from runner.job import check_folder, continued_in_sweep, prepare_job

        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        if continued_in_sweep(cfg, run_dir):
            return None
        try:
            check_folder(cfg, run_dir)
            return prepare_job(cfg, run_dir, dict(hydra_cfg.runtime.choices), list(hydra_cfg.overrides.task),
                               hydra_cfg.sweep.dir)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from runner.engine.fused import fusion_groups, run_group
        from runner.errors import EXIT_OK, JobFailed, SweepInterrupted, interrupted_codes
        from runner.runs.files import hold_folder
        from runner.job import Job, monitored_value, run_prepared
        from runner.report.sweep import write_summary_csv

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        returns: list[JobReturn] = []
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id = config.hydra.job.num = idx
            returns.append(run_job(hydra_context=self.hydra_context, task_function=self.prepare, config=config,
                                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir"))
        codes: dict[int, int] = {}
        ready: list[tuple[int, Job]] = []
        for i, ret in enumerate(returns):
            if ret.status == JobStatus.COMPLETED and isinstance(ret.return_value, Job):
                ready.append((i, ret.return_value))
            elif ret.status == JobStatus.COMPLETED:
                codes[i] = EXIT_OK if ret.return_value is None else int(ret.return_value)
        interrupted = None
        for group in fusion_groups([job.config for _, job in ready]):
            members = [ready[g] for g in group]
            with logging_to([job.run_dir for _, job in members]):
                if len(members) == 1:
                    group_codes = [run_prepared(members[0][1])]
                else:
                    with contextlib.ExitStack() as held:
                        for _, job in members:
                            held.enter_context(hold_folder(job.run_dir))
                        group_codes = run_group([(j.config, j.run_dir, j.choices, j.info) for _, j in members])
            codes.update({i: code for (i, _), code in zip(members, group_codes)})
            write_summary_csv(sweep_dir)  # after each group, as the basic launcher after each job
            interrupted = next((c for c in group_codes if c in interrupted_codes()), None)
            if interrupted:
                break  # no further job starts; resume=<sweep folder> finishes the sweep
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        for i, ret in enumerate(returns):
            if i not in codes:
                continue  # failed to compose or start (Hydra recorded it), or never started
            if codes[i] == EXIT_OK:  # its value for a sweeper that optimises, as the basic launcher's
                run_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir)
                ret.status, ret.return_value = JobStatus.COMPLETED, monitored_value(run_dir, ret.cfg.trainer.monitor)
            else:
                ret.status = JobStatus.FAILED
                ret.return_value = JobFailed(f"exit code {codes[i]}")
        if interrupted:
            raise SweepInterrupted(interrupted)
        return returns
