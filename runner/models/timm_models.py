"""Any timm model (``model=timm model.name=resnet18``; ``pip install 'runner[timm]'``), built by
``timm.create_model`` with ``num_classes`` set to the family's outputs (timm replaces the head).

``model.weights=true`` takes timm's pretrained weights from the local Hugging Face cache only
(offline) unless ``model.download=true``.
"""
from __future__ import annotations

import os
from typing import Any

from torch import nn

from runner.errors import UserError


def build(name: str, num_outputs: int, weights: bool = False, download: bool = False, **kwargs: Any) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise UserError("model=timm needs timm: pip install 'runner[timm]'") from None
    if not timm.is_model(name):
        raise UserError(f"model.name={name!r} is not a timm model; timm.list_models() lists them (e.g. resnet18, "
                        "convnext_tiny, vit_small_patch16_224)")
    offline = weights and not download
    previous = os.environ.get("HF_HUB_OFFLINE")
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return timm.create_model(name, pretrained=bool(weights), num_classes=num_outputs, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        if not weights:
            raise UserError(f"model {name}: {str(e).splitlines()[0]}") from None
        raise UserError(f"model.weights=true: the pretrained weights of timm's {name} are not in the local "
                        f"Hugging Face cache; fetch them once with: python -c \"import timm; "
                        f"timm.create_model('{name}', pretrained=True)\" (or set model.download=true)") from None
    finally:
        if offline:
            if previous is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = previous
