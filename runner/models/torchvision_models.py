"""Any torchvision classification model (``model=torchvision model.name=resnet18``), with its
classification head replaced for the family's outputs (N labels or C classes).

Pretrained weights come from torch's local hub cache (``$TORCH_HOME/hub/checkpoints``, where
torchvision itself keeps them); nothing is downloaded unless ``model.download=true``. A weights
file missing from the cache stops the run before it starts, naming the file and the command that
fetches it. A cached file is opened with ``weights_only=True`` first, so a file that holds more
than tensors is refused as checkpoints are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision.models
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from runner.errors import UserError


def classification_models() -> list[str]:
    return list_models(module=torchvision.models)


def _weights(name: str, weights: str) -> Any:
    """The weights enum member for ``model.weights`` (DEFAULT, IMAGENET1K_V1, or the full
    ResNet18_Weights.IMAGENET1K_V1)."""
    enum = get_model_weights(name)
    member = weights.rsplit(".", 1)[-1]
    if member not in enum.__members__:
        raise UserError(f"model.weights={weights!r} is not a weights name of {name}; "
                        f"allowed: null, {', '.join(enum.__members__)}")
    return enum[member]


def cached_file(weights: Any) -> Path:
    """Where torch.hub keeps (or would keep) the file of ``weights``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def _check_cached(name: str, weights: Any, label: str) -> None:
    path = cached_file(weights)
    if not path.is_file():
        raise UserError(f"model.weights={label}: {path} is not in the local cache and nothing is downloaded "
                        f"unless asked; fetch it once with: python -c \"import torch; "
                        f"torch.hub.load_state_dict_from_url('{weights.url}')\" (or set model.download=true)")
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - truncated, or more than tensors: the user's to fix
        raise UserError(f"model.weights={label}: {path} is not a plain state dict "
                        f"(refused: it loads only with weights_only=True): {str(e).splitlines()[0]}") from None


def output_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The classification head: the last Linear (or the 1x1 Conv2d of SqueezeNet) of the model."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise UserError(f"{type(model).__name__} has no Linear or Conv2d layer to use as the output layer")
    return layers[-1]


def replace_output_layer(model: nn.Module, num_outputs: int) -> nn.Module:
    name, old = output_layer(model)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_outputs, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_outputs, kernel_size=1)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], new)
    return model


def build(name: str, num_outputs: int, weights: str | None = None, download: bool = False, **kwargs: Any) -> nn.Module:
    """torchvision's ``name`` with a fresh ``num_outputs``-way head; ``weights`` (e.g. DEFAULT)
    for the rest of the net. Further keys (``memory_efficient``, ``dropout``, ...) go to
    torchvision's builder."""
    if "num_classes" in kwargs:
        raise UserError(f"model.num_classes is set from the data ({num_outputs} outputs here): leave it out")
    if name not in classification_models():
        sample = ", ".join(n for n in ("resnet18", "resnet50", "densenet121", "efficientnet_b0", "convnext_tiny",
                                       "vit_b_16") if n in classification_models())
        raise UserError(f"model.name={name!r} is not a torchvision classification model; e.g. {sample} "
                        f"({len(classification_models())} in all: torchvision.models.list_models(torchvision.models))")
    if weights is None:
        return get_model(name, weights=None, num_classes=num_outputs, **kwargs)
    member = _weights(name, str(weights))
    if not download:
        _check_cached(name, member, str(weights))
    try:
        model = get_model(name, weights=member, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"model {name} with weights {weights}: {str(e).splitlines()[0]}") from None
    return replace_output_layer(model, num_outputs)
