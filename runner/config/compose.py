"""Composing a job's config with Hydra: runner's schema and resolvers registered, the shipped
configs (runner/conf/, package data: a wheel carries them) and a user's ``--config-dir``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from runner.config.schema import Config, TrainerConfig
from runner.errors import UserError

# An absolute path: relative ones are resolved differently under `python -m` and the console script.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="runner_schema", node=Config)
    # The trainer's defaults live in TrainerConfig alone: the dataclass is the group's option.
    store.store(group="trainer", name="default", node=TrainerConfig)


def on_one_gpu(strategy: Any, yes: Any = True, no: Any = False) -> Any:
    """``yes`` where the run will be one process on a GPU (device=gpu, or device=auto with CUDA
    visible), ``no`` elsewhere. Presets turn the captured-step path on with it only where that
    path can run: ``trainer.cuda_graph: ${on_one_gpu:${device.strategy}}``."""
    import torch

    one_gpu = str(getattr(strategy, "value", strategy)) in ("gpu", "auto") and torch.cuda.is_available()
    return yes if one_gpu else no


def register_resolvers() -> None:
    from runner.config.paths import launch_path
    from runner.runs.folders import checked_root, claim_unique_dir, hydra_subdir, run_folder
    from runner.runs.names import title_resolver

    # use_cache: Hydra copies resolver caches into each job's config (as it does for ${now:}),
    # so a sweep's jobs, even in other processes (joblib), see the folder the sweep claimed.
    OmegaConf.register_new_resolver("run_folder", run_folder, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("unique_dir", claim_unique_dir, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("hydra_subdir", hydra_subdir, replace=True)
    OmegaConf.register_new_resolver("checked_root", checked_root, replace=True)
    OmegaConf.register_new_resolver("on_one_gpu", on_one_gpu, replace=True)
    OmegaConf.register_new_resolver("run_title", title_resolver, replace=True)
    OmegaConf.register_new_resolver("launch_path", launch_path, replace=True)  # paths.data_dir from the launch folder


def compose_job(overrides: Sequence[str], config_dir: str | None = None) -> Any:
    """The composed config with its ``hydra`` node, as the command line composes it, and its run
    folder claimed (``hydra.run.dir``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from runner.config.messages import describe

    register_configs()
    register_resolvers()
    config_dir = config_dir or os.environ.get("RUNNER_CONFIG_DIR")  # your configs (and local/default.yaml)
    search = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose("config", overrides=[*overrides, *search], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # ${hydra:...} in the run folder's name resolves
        cfg.hydra.run.dir  # claims the run folder here: its checks (resume=, output_root=) are composition errors too
        return cfg
    except Exception as e:  # composition errors: one message, as on the command line
        raise UserError(describe(e, list(overrides))) from None
