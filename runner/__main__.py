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
from omegaconf import DictConfig, OmegaConf

from runner.config import register_configs, register_resolvers
from runner.errors import EXIT_SIGINT, EXIT_USER_ERROR, UserError

_state = {"task_started": False, "codes": []}


def load_resumed_config(cfg: DictConfig) -> DictConfig:
    """``resume=<run folder>`` continues with the config that run started with."""
    folder = Path(cfg.resume)
    saved = folder / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise UserError(f"resume={folder} is not a run folder (no .hydra/config.yaml in it)")
    resumed = OmegaConf.load(saved)
    resumed.resume = str(folder)
    return resumed


# An absolute path: relative ones are resolved differently under `python -m` and the console script.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _task(cfg: DictConfig) -> float:
    from runner.engine.run import run  # heavy imports after the config is known to be valid

    _state["task_started"] = True
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        if cfg.resume:
            cfg = load_resumed_config(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_USER_ERROR
    else:
        from runner.engine.launch import maybe_spawn  # ddp: start our own workers if asked

        code = maybe_spawn(cfg, run_dir)
        if code is None:
            rank0 = int(os.environ.get("RANK", "0")) == 0
            code = run(cfg, run_dir if rank0 else None)
    _state["codes"].append(code)
    if hydra_cfg.mode == RunMode.RUN and code != 0:
        sys.exit(code)
    return monitored_value(cfg, run_dir)


def monitored_value(cfg: DictConfig, run_dir: Path) -> float:
    """The job's value for a sweeper that optimises (Optuna): its final monitored metric."""
    from runner.engine.results import read_summary

    summary = read_summary(run_dir) or {}
    value = summary.get("metrics", {}).get(cfg.trainer.monitor)
    return float(value) if isinstance(value, (int, float)) and summary.get("status") == "completed" else float("nan")


def main() -> None:
    register_configs()
    register_resolvers()
    # Let composition errors reach us as exceptions instead of Hydra's traceback printout.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        _task()
    except KeyboardInterrupt:
        sys.exit(EXIT_SIGINT)
    except Exception as e:  # composition / override errors: before any run folder has content
        if _state["task_started"]:
            raise
        from runner.config_errors import describe

        print(f"error: {describe(e, sys.argv[1:])}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    from runner.sweep import last_sweep_failures

    if any(code != 0 for code in _state["codes"]) or last_sweep_failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
