"""``python -m runner [overrides]``: the Hydra entry point.

Exit codes: 0 completed; 1 failed at run time; 2 bad config or bad input; 130/143 interrupted.
Config errors found by Hydra while composing never reach the terminal as a traceback: they are
turned into one message naming the key and what is allowed.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from runner.config.compose import CONF_DIR, register_configs, register_resolvers
from runner.config.paths import config_dir_argv, load_dotenv
from runner.report.sweep import write_summary_csv
from runner.engine import slurm
from runner.errors import (EXIT_FAILED, EXIT_SIGINT, EXIT_USER_ERROR, JobFailed, SweepInterrupted, UserError,
                           interrupted_codes)


def sweep_resumed(argv: list[str]) -> list[str]:
    """``python -m runner resume=<sweep folder>``: the sweep's own command again, into its folder
    (each job then keeps, continues or starts its run); any other command line as it is."""
    resumes = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("resume=")]
    if len(resumes) != 1 or not (Path(resumes[0]) / "multirun.yaml").is_file():
        return argv
    from omegaconf import OmegaConf

    from runner.job import key_of, override_keys, refuse_unchangeable

    sweep = Path(resumes[0]).resolve()
    saved = OmegaConf.load(sweep / "multirun.yaml").hydra.overrides
    # The command line's other overrides apply to every job, as for a resumed run: those that may
    # change mid-run replace the sweep's own (launcher choices pass: they say how the jobs run).
    extra = [a for a in argv[1:] if not a.startswith("resume=") and a not in ("-m", "--multirun")]
    refuse_unchangeable([k for k in override_keys(extra) if not k.startswith("hydra/")])
    extra.append(f"hydra.sweep.dir={sweep}")
    given = {key_of(a) for a in extra}
    kept = [o for o in [*saved.hydra, *saved.task] if key_of(o) not in given]
    return [argv[0], "-m", *kept, *extra]


def main() -> None:
    register_configs()
    register_resolvers()
    # Composition errors reach us as exceptions (whatever the user's HYDRA_FULL_ERROR), and are
    # turned into one message below.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    started = []  # a job started: an exception after that is a bug to show, not a config error

    @hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
    def task(cfg: DictConfig) -> float:
        from runner.job import continued_in_sweep, monitored_value, run_job

        started.append(True)
        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        single = hydra_cfg.mode == RunMode.RUN
        try:
            # A submitit job runs this function without main(): SLURM's task variables as RANK etc.
            slurm.export_distributed_env()
            # A sweep replayed into its folder, or a requeued SLURM job back in the folder it claimed
            # (runner/engine/slurm.py): a job that ran there is kept, or continued from its checkpoint.
            if (not single or slurm.restart_count() > 0) and continued_in_sweep(cfg, run_dir):
                return monitored_value(run_dir, cfg.trainer.monitor)  # completed before: kept as it is
            code, _ = run_job(cfg, run_dir, dict(hydra_cfg.runtime.choices), list(hydra_cfg.overrides.task),
                           None if single else hydra_cfg.sweep.dir, single=single)
        except UserError as e:  # found before the run started: one line, no run folder content
            print(f"error: {e}", file=sys.stderr)
            code = EXIT_USER_ERROR
        if code in interrupted_codes() and slurm.requeue(code, run_dir):
            # SLURM's warning before the time limit: checkpointed and requeued; the requeued job
            # continues here. The first task exits with the code; the others quietly (rank 0 requeued).
            sys.exit(code if slurm.process_rank() == 0 else 0)
        if single and code != 0:
            sys.exit(code)
        if code in interrupted_codes():
            write_summary_csv(Path(hydra_cfg.sweep.dir))  # the jobs that ran, this one interrupted
            raise SweepInterrupted(code)
        if code != 0:
            raise JobFailed(f"exit code {code}")
        return monitored_value(run_dir, cfg.trainer.monitor)

    try:
        load_dotenv()  # the launch folder's .env (RUNNER_DATA_DIR=...), before anything reads the environment
        slurm.export_distributed_env()  # srun's tasks as torchrun's RANK etc., before the run folder is chosen
        sys.argv = config_dir_argv(sweep_resumed(sys.argv))  # $RUNNER_CONFIG_DIR as --config-dir
        task()
    except KeyboardInterrupt:
        sys.exit(EXIT_SIGINT)
    except SweepInterrupted as e:
        print(f"sweep interrupted: no further job starts; continue it with resume=<its folder>", file=sys.stderr)
        sys.exit(e.exit_code)
    except JobFailed:
        sys.exit(EXIT_FAILED)
    except Exception as e:  # composition / override errors: before any run folder has content
        if started:
            raise
        from runner.config.messages import describe

        print(f"error: {describe(e, sys.argv[1:])}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
