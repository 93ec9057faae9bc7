"""``mode=eval`` and ``mode=predict`` take the config of the run that wrote the checkpoint.

``python -m runner mode=eval ckpt_path=<run>/checkpoints/best.pt`` should evaluate that run's
model on that run's data, not the default experiment's DenseNet. ``config_for_checkpoint``
returns the run's own config (its folder's ``.hydra/config.yaml``, or else the resolved config
every checkpoint carries under ``config``) with only what the command line gives applied on top:
``mode``, ``ckpt_path``, ``dataset.*`` for new data, ``device``, ``trainer.eval_batch_size``,
``logger``... The folder this run writes to (``output_root``) is always the command line's. A
command line that names an ``experiment`` has chosen its config itself and keeps it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from runner.errors import UserError

MODES = ("eval", "predict")
ALWAYS_OURS = ("output_root",)  # where this run writes, not what the model was


def key_of(override: str) -> str:
    """The key an override sets: ``+trainer.x=1`` -> ``trainer.x``."""
    return str(override).split("=", 1)[0].lstrip("+~")


def given_keys(overrides: Sequence[str]) -> list[str]:
    """The config keys the command line sets (Hydra's own and its groups, ``hydra/launcher=...``, left out)."""
    keys = [key_of(o) for o in overrides]
    return [k for k in keys if not (k == "hydra" or k.startswith("hydra.") or k.startswith("hydra/"))]


def run_folder_of(ckpt_path: str | Path) -> Path:
    """``<run>/checkpoints/best.pt`` -> ``<run>``."""
    return Path(ckpt_path).resolve().parent.parent


def saved_run_config(ckpt_path: str | Path) -> DictConfig | None:
    """The config of the run that wrote the checkpoint: its folder's ``.hydra/config.yaml`` (the
    config it ran: runner/config/prepare.py), else the checkpoint's own ``config``; None where
    neither is there (a checkpoint from elsewhere)."""
    folder = run_folder_of(ckpt_path)
    saved = folder / ".hydra" / "config.yaml"
    if saved.is_file():
        try:
            cfg = OmegaConf.load(saved)
        except (yaml.YAMLError, ValueError) as e:
            raise UserError(f"ckpt_path={ckpt_path}: its run's {saved} is not a readable config: "
                            f"{str(e).splitlines()[0]}") from None
        if isinstance(cfg, DictConfig) and "trainer" in cfg:
            return cfg
    return checkpoint_config(ckpt_path)


def checkpoint_config(ckpt_path: str | Path) -> DictConfig | None:
    """The resolved config a runner checkpoint stores under ``config`` (YAML text), or None."""
    import torch

    try:
        text = torch.load(ckpt_path, map_location="cpu", weights_only=True).get("config")
    except Exception:  # unreadable: the checkpoint's own loader says why, later
        return None
    cfg = OmegaConf.create(text) if isinstance(text, str) and text.strip() else None
    return cfg if isinstance(cfg, DictConfig) and "trainer" in cfg else None


def config_for_checkpoint(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """For ``mode=eval|predict ckpt_path=...`` without ``experiment=``: the checkpoint's run's
    config with the command line's keys (``overrides``, Hydra's task overrides, taken from the
    composed ``cfg``) applied on top. Any other command line: ``cfg`` unchanged."""
    keys = given_keys(overrides)
    mode = cfg.get("mode")
    if str(getattr(mode, "value", mode)) not in MODES or not cfg.get("ckpt_path") or "experiment" in keys:
        return cfg
    if not Path(str(cfg.ckpt_path)).is_file():
        return cfg  # the rules say so, naming the path
    run_cfg = saved_run_config(cfg.ckpt_path)
    if run_cfg is None:
        return cfg
    for override in overrides:
        key = key_of(override)
        if key not in keys:
            continue
        if str(override).startswith("~"):
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(run_cfg, parent) if parent else run_cfg
            if isinstance(node, DictConfig) and leaf in node:
                with open_dict(node):
                    del node[leaf]
            continue
        set_key(run_cfg, key, OmegaConf.select(cfg, key, throw_on_missing=False))
    for key in ALWAYS_OURS:
        set_key(run_cfg, key, OmegaConf.select(cfg, key))
    return run_cfg


def set_key(cfg: DictConfig, key: str, value: Any) -> None:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)  # a whole group's node (dataset=..., device=cpu), its interpolations kept
    OmegaConf.update(cfg, key, value, merge=False, force_add=True)
