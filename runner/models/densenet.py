"""DenseNet121 (torchvision) with an N-label linear head that outputs logits.

Never downloads: ``weights_path`` loads a local state dict, either a full one saved from this
model or torchvision's ImageNet checkpoint (its 1000-class classifier is left out and the new
head keeps its fresh initialisation). Inputs from 32 px upwards work: the adaptive average pool
before the head takes whatever spatial size the last dense block leaves.
``memory_efficient`` passes through to torchvision (checkpointed dense layers: less memory,
slower).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torchvision.models import densenet121 as tv_densenet121

from runner.errors import UserError

# torchvision's own fix for the key names of the original DenseNet checkpoints ("norm.1" -> "norm1").
_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _load_local(model: nn.Module, weights_path: str) -> None:
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise UserError(f"model.weights_path={weights_path!r}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"model.weights_path={weights_path!r} is not a readable state dict: {e}") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UserError(f"model.weights_path={weights_path!r} holds a {type(state).__name__}, not a state dict")
    state = {(_OLD_KEY.sub(r"\1\2", k)).removeprefix("module."): v for k, v in state.items()}
    head = model.classifier
    if state.get("classifier.weight") is not None and state["classifier.weight"].shape != head.weight.shape:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        raise UserError(
            f"model.weights_path={weights_path!r} does not fit densenet121: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def densenet121(num_labels: int, weights_path: str | None = None, memory_efficient: bool = False) -> nn.Module:
    model = tv_densenet121(weights=None, memory_efficient=memory_efficient)
    model.classifier = nn.Linear(model.classifier.in_features, num_labels)
    if weights_path:
        _load_local(model, weights_path)
    return model
