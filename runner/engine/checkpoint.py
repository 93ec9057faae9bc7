"""Checkpoints: weights, optimizer, schedule, grad scaler, loop position, every RNG state and the
callbacks' own state: what ``resume=`` needs to continue a run exactly (``save_trainer`` and
``restore_trainer``), and the weights that mode=eval, mode=predict and fine-tuning load.

Everything stored is a tensor, a number, a string or a container of those, so checkpoints load
with ``torch.load(weights_only=True)`` and never unpickle arbitrary objects.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_map

from runner.runs.files import atomic_write
from runner.errors import UserError

FORMAT_VERSION = 2  # 2: the loop's stop and the best values moved into the callbacks' state
READABLE = (1, 2)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": _python_state_to_tensor(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state_to_tensor(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": float(gauss) if gauss is not None else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def own_storage(tensors: dict[str, Any]) -> dict[str, Any]:
    """Tensors that are views into a larger storage (a fused job's parameters are slices of the
    group's stack) copied out: torch.save writes a tensor's whole storage."""
    return {name: t.clone() if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > t.nbytes else t
            for name, t in tensors.items()}


def own_optimizer_storage(state_dict: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's state dict with its state tensors copied out of larger storages (a fused
    group's jobs keep slices of one stacked state: runner/engine/stacked_optimizer.py)."""
    return {**state_dict, "state": {i: own_storage(state) for i, state in state_dict["state"].items()}}


def content_digest(payload: Any) -> str:
    """SHA-256 of a payload's content in a canonical order: every tensor's dtype, shape and bytes,
    every other value's repr. What torch.load gives back hashes to the same digest, so a byte
    changed anywhere in a checkpoint (a bad disk, a torn copy, a hand edit) is found on loading."""
    digest = hashlib.sha256()

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{t.dtype}{tuple(value.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(b"{")
            for key in sorted(value, key=str):
                digest.update(repr(key).encode())
                walk(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                walk(item)
            digest.update(b"]")
        else:
            digest.update(repr(value).encode())

    walk(payload)
    return digest.hexdigest()


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically with its content's digest inside (``checksum``); the one it
    replaces, if it is ``last.pt``, is kept as ``last.prev.pt``: a run whose last checkpoint is
    found damaged can go on from the one before."""
    payload = tree_map(lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v,
                       {"format_version": FORMAT_VERSION, **payload})
    payload["checksum"] = content_digest(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path = Path(path)
    if path.name == "last.pt" and path.is_file():
        os.replace(path, path.with_name("last.prev.pt"))
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


class DamagedCheckpoint(UserError):
    """A checkpoint whose content does not match the digest it was written with."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or holds objects we refuse to unpickle
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} cannot be read (truncated or not a runner checkpoint): {first_line}") from None
    if not isinstance(payload, dict) or "model" not in payload or payload.get("format_version") not in READABLE:
        raise UserError(f"checkpoint {path} is not a runner checkpoint (format {FORMAT_VERSION})")
    saved = payload.pop("checksum", None)  # checkpoints of format 1 carry none
    if saved is not None and content_digest(payload) != saved:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: its content does not match the checksum it was "
                                "written with")
    if torch.device(map_location).type != "cpu":
        payload = tree_map(lambda v: v.to(map_location) if isinstance(v, torch.Tensor) else v, payload)
    return payload


def load_last(run_dir: Path) -> dict[str, Any] | None:
    """The run's last checkpoint for resume= (None where it has none); a damaged one exits 2
    naming it, and the previous one where that is intact."""
    last = Path(run_dir) / "checkpoints" / "last.pt"
    if not last.is_file():
        return None
    try:
        return load_checkpoint(last)
    except DamagedCheckpoint as damaged:
        previous = last.with_name("last.prev.pt")
        try:
            step = load_checkpoint(previous)["loop"]["step"] if previous.is_file() else None
        except UserError:
            step = None
        hint = (f"; the one before, {previous} (step {step}), is intact: move it over last.pt "
                f"(mv {previous} {last}) and resume again to continue from there" if step is not None
                else "; there is no intact earlier checkpoint to continue from")
        raise DamagedCheckpoint(f"{damaged}{hint}") from None


def load_model_weights(model: torch.nn.Module, payload: dict[str, Any], path: str | Path,
                       strict: bool = True, for_training: bool = True) -> list[str]:
    """Load weights, with one clear message when the checkpoint belongs to another model.
    ``strict=False`` loads the tensors whose names and shapes fit and returns the names of the
    model's tensors it left as they were (fine-tuning with a new head)."""
    own = model.state_dict()
    theirs = payload["model"]
    missing = sorted(own.keys() - theirs.keys())
    unexpected = sorted(theirs.keys() - own.keys())
    mismatched = sorted(k for k in own.keys() & theirs.keys() if own[k].shape != theirs[k].shape)
    if not strict:
        fitting = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
        if not fitting:
            raise UserError(f"checkpoint {path} has no tensor that fits this model "
                            f"({payload.get('model_target', 'another model')})")
        model.load_state_dict(fitting, strict=False)
        return sorted(own.keys() - fitting.keys())
    if missing or unexpected or mismatched:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unknown tensors (e.g. {unexpected[0]})")
        if mismatched:
            k = mismatched[0]
            detail.append(f"{len(mismatched)} of other shapes (e.g. {k}: {tuple(theirs[k].shape)} vs {tuple(own[k].shape)})")
        made_by = payload.get("model_target", "another model")
        hint = (" (ckpt_strict=false loads the tensors that fit)" if for_training else
                "; evaluate it with its own run's config: leave experiment= and the model and dataset options out "
                "(mode=eval|predict with ckpt_path takes the config of the run that wrote it), or give that run's "
                "own experiment and overrides (its .hydra/overrides.yaml)")
        raise UserError(f"checkpoint {path} belongs to another model or config ({made_by}): " + "; ".join(detail)
                        + hint)
    model.load_state_dict(theirs)
    return []


# --- a job's whole state (runner/engine/loop.py Trainer) --------------------------------------
def trainer_payload(trainer: Any, running: tuple[torch.Tensor, int]) -> dict[str, Any]:
    return {
        "model": own_storage(trainer.family.raw_model.state_dict()),
        "optimizer": own_optimizer_storage(trainer.optimizer.state_dict()),
        "schedule": trainer.schedule.state_dict(),
        "scaler": trainer.stepper.scaler.state_dict(),
        "loop": asdict(trainer.state),
        "rng": family_rng_state(trainer.family),
        "family": trainer.family.state_dict() if hasattr(trainer.family, "state_dict") else {},
        # The last validation's metrics: a run resumed after it still reports them.
        "metrics": dict(trainer.final_metrics),
        "eval_samples": dict(trainer.eval_samples),
        "callbacks": trainer.callbacks.state_dict(),
        # The training loss since the last logging point: the next row averages the same steps.
        "running": {"loss": running[0], "units": running[1]},
        **trainer.meta,
    }


def save_trainer(trainer: Any, name: str) -> Path | None:
    """``<run_dir>/checkpoints/<name>.pt`` from rank 0 (the others wait for it); its path, or None
    on a process that writes no files. Callbacks may add to the payload first."""
    path = None
    running = trainer.stepper.running_totals()  # a collective: every rank
    if trainer.ctx.is_main and trainer.run_dir is not None:
        payload = trainer_payload(trainer, running)
        trainer.callbacks.call("on_save_checkpoint", trainer, payload)
        path = trainer.run_dir / "checkpoints" / f"{name}.pt"
        save_checkpoint(path, payload)
        trainer.callbacks.call("on_checkpoint_saved", trainer, path)
    trainer.ctx.barrier()
    return path


def restore_trainer(trainer: Any, payload: dict[str, Any], path: Path) -> None:
    """Continue a run from its checkpoint: everything ``trainer_payload`` stored."""
    from runner.engine.loop import LoopState

    load_model_weights(trainer.family.raw_model, payload, path)
    trainer.optimizer.load_state_dict(payload["optimizer"])
    for group in trainer.optimizer.param_groups:  # a captured step reads its lr tensor on the device
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = group["lr"].to(trainer.ctx.device)
    trainer.schedule.load_state_dict(payload["schedule"])
    trainer.stepper.scaler.load_state_dict(payload["scaler"])
    loop, callbacks = dict(payload["loop"]), dict(payload.get("callbacks", {}))
    if payload["format_version"] == 1:  # the best values lived in the loop's state then
        callbacks = {"checkpoints": {"best": loop.get("best"), "top": loop.get("top", [])},
                     "early_stopping": {"best": loop.get("best"), "stale": loop.get("stale_validations", 0)}}
        loop["stopped"] = "early_stopping" if loop.get("stopped_early") else None
        loop = {k: v for k, v in loop.items() if k not in ("best", "top", "stale_validations", "stopped_early")}
    trainer.state = LoopState(**loop)
    trainer.callbacks.load_state_dict(callbacks)
    trainer.final_metrics = dict(payload.get("metrics", {}))
    trainer.eval_samples = dict(payload.get("eval_samples", {}))
    set_family_rng_state(trainer.family, payload["rng"])
    if "running" in payload:
        trainer.stepper.restore_running(payload["running"]["loss"].to(trainer.ctx.device), payload["running"]["units"])
    if payload.get("family") and hasattr(trainer.family, "load_state_dict"):
        trainer.family.load_state_dict(payload["family"])


def family_rng_state(family: Any) -> dict[str, Any]:
    """Every RNG state the next step depends on. A fused job (runner/engine/fused.py) draws from
    its own generator: its state takes the place of the device's global one, so that the
    checkpoint is the one of the same job run alone."""
    generator = family.generator
    if generator is None:
        return rng_state()
    state = dict(family.rng_at_build)
    if generator.device.type == "cuda":
        index = generator.device.index or 0
        state["cuda"] = [generator.get_state() if i == index else s for i, s in enumerate(state["cuda"])]
    else:
        state["torch"] = generator.get_state()
    return state


def set_family_rng_state(family: Any, state: dict[str, Any]) -> None:
    generator = family.generator
    if generator is None:
        set_rng_state(state)
        return
    family.rng_at_build = state
    generator.set_state(state["cuda"][generator.device.index or 0] if generator.device.type == "cuda"
                        else state["torch"])
