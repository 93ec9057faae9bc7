"""Any timm model (``model=timm model.name=resnet18``; ``pip install 'runner[timm]'``), built by
``timm.create_model`` with ``num_classes`` set to the family's outputs (timm replaces the head).

``model.weights=true`` takes timm's pretrained weights from the local caches only unless
``model.download=true``: runner finds the file itself, in the Hugging Face cache
(``huggingface_hub.try_to_load_from_cache``, which reads the cache folder and nothing else) or, for
weights timm knows only by URL, in torch's hub cache; opens it with ``weights_only=True``; and hands
timm the tensors (``pretrained_cfg_overlay={"state_dict": ...}``), so that timm adapts the head
and input channels as usual but never reaches for the hub. (Setting ``HF_HUB_OFFLINE`` here would
not do: huggingface_hub reads it once, when it is first imported, and timm imports it.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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
    if weights and not download:
        kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}),
                                            "state_dict": cached_state_dict(name), "source": None}
    try:
        return timm.create_model(name, pretrained=bool(weights), num_classes=num_outputs, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        if not weights or not download:
            raise UserError(f"model {name}: {str(e).splitlines()[0]}") from None
        raise UserError(f"model.weights=true model.download=true: timm could not fetch the weights of {name}: "
                        f"{str(e).splitlines()[0]}") from None


def cached_files(name: str) -> list[Path]:
    """Where the pretrained weights of timm's ``name`` may be cached, as timm would look: its
    Hugging Face repository's safetensors file, then its PyTorch file; then torch's hub cache for
    the file of its URL. Only the files that exist."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise UserError(f"model.weights=true: timm's {name} has no pretrained weights; timm.list_pretrained() "
                        "lists the models that have")
    found: list[Path] = []
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        filename = cfg.hf_hub_filename or "pytorch_model.bin"
        safe = "model.safetensors" if filename == "pytorch_model.bin" else str(Path(filename).with_suffix(".safetensors"))
        for candidate in dict.fromkeys([safe, filename]):
            path = try_to_load_from_cache(repo, candidate, revision=revision or None)
            if isinstance(path, str):  # else None (not cached) or a marker that the repo has no such file
                found.append(Path(path))
    if cfg.url:
        import torch

        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if path.is_file():
            found.append(path)
    return found


def cached_state_dict(name: str) -> dict:
    """The pretrained tensors of timm's ``name`` from the local cache (weights_only=True, as checkpoints
    are opened), or exit 2 naming the command that fetches them."""
    from timm.models import load_state_dict

    files = cached_files(name)
    if not files:
        raise UserError(f"model.weights=true: the pretrained weights of timm's {name} are not in the local "
                        f"Hugging Face cache; fetch them once with: python -c \"import timm; "
                        f"timm.create_model('{name}', pretrained=True)\" (or set model.download=true)")
    try:
        return load_state_dict(str(files[0]), weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, or more than tensors: the user's to fix
        raise UserError(f"model.weights=true: {files[0]} is not a plain state dict "
                        f"(refused: it loads only with weights_only=True): {str(e).splitlines()[0]}") from None
