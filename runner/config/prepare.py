"""The config a new job runs, from the one Hydra composed: a ``_target_`` changed on the command
line starts its node clean (targets.py), and ``mode=eval|predict`` take the checkpoint's run's
config (from_checkpoint.py). Where that changed the config, the run folder's
``.hydra/config.yaml`` is rewritten with it, so that it says what ran, and ``resume=`` and a
later ``mode=eval`` read that."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from runner.config.from_checkpoint import config_for_checkpoint
from runner.config.targets import drop_preset_keys


def prepared_config(cfg: DictConfig, overrides: Sequence[str], choices: dict[str, Any] | None,
                    run_dir: Path | None) -> DictConfig:
    """``cfg`` (changed in place where keys are dropped) or the checkpoint's run's config.
    ``overrides``: Hydra's task overrides; ``choices``: the option chosen in each group. Not for
    ``resume=``: a resumed run keeps the config its folder holds."""
    dropped = drop_preset_keys(cfg, overrides, choices)
    prepared = config_for_checkpoint(cfg, overrides)
    saved = Path(run_dir) / ".hydra" / "config.yaml" if run_dir is not None else None
    if (dropped or prepared is not cfg) and saved is not None and saved.is_file():
        OmegaConf.save(prepared, saved)
    return prepared
