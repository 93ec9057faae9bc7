"""Checkpoints: weights, optimizer, schedule, grad scaler, loop position and every RNG state.

Everything stored is a tensor, a number, a string or a container of those, so checkpoints load
with ``torch.load(weights_only=True)`` and never unpickle arbitrary objects.
"""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runner.runs.files import atomic_write
from runner.errors import UserError

FORMAT_VERSION = 1


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


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    payload = {"format_version": FORMAT_VERSION, **payload}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or holds objects we refuse to unpickle
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} cannot be read (truncated or not a runner checkpoint): {first_line}") from None
    if not isinstance(payload, dict) or "model" not in payload or payload.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} is not a runner checkpoint (format {FORMAT_VERSION})")
    return payload


def load_model_weights(model: torch.nn.Module, payload: dict[str, Any], path: str | Path,
                       strict: bool = True) -> list[str]:
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
        raise UserError(
            f"checkpoint {path} belongs to another model or config ({made_by}): " + "; ".join(detail)
            + " (ckpt_strict=false loads the tensors that fit)"
        )
    model.load_state_dict(theirs)
    return []
