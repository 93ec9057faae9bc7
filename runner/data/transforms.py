"""Per-sample image transforms: ``dataset.train_transforms`` and ``dataset.eval_transforms``.

Each is a list of ``torchvision.transforms.v2`` nodes (``_target_`` plus arguments; any callable
from tensor image to tensor image works), applied in the DataLoader workers to one decoded 8-bit
image [C, H, W] at a time — at its file's own resolution, so a random crop sees the whole photo.
The dataset then brings the result to ``image_size`` squared (a resize, where the list left
another size) and normalises it, unless the list made float images already (it ends with
``ToDtype`` and ``Normalize``: ``dtype: torch.float32`` is read as the dtype).

Seeded draws. A transform draws from torch's global generator. Each item is made under
``torch.random.fork_rng`` with the generator seeded for that item, so the main process's
global RNG is left as it was (num_workers=0) and a worker's history does not matter: training
items come as ``(index, seed)`` pairs from the sampler (runner/engine/data.py, ``SeededIndices``:
the seed follows from trainer.seed, the epoch and the position in the epoch's order, so resume
is exact), any other item (evaluation, direct access) as a bare index, which is its seed.
"""
from __future__ import annotations

import contextlib
import difflib
import re
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import resize

from runner.config.build import checked_kwargs, locate, plain
from runner.errors import UserError

EXAMPLES = "RandomResizedCrop, RandomCrop, RandomHorizontalFlip, ColorJitter, RandomErasing, ToDtype, Normalize"


def item_key(key: Any) -> tuple[int, int]:
    """(index, seed) of an item key: the training sampler's pair, or a bare index (its own seed)."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), int(key)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Draws inside come from generators seeded with ``seed``; the global ones are restored after."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda:  # a transform that draws on the image's device (noise): that device's generator
            torch.cuda.default_generators[device.index if device.index is not None else 0].manual_seed(seed)
        yield


def _check_target(node: dict, where: str) -> None:
    """Exit 2 naming the node when its _target_ does not import (with the v2 names it may mean)."""
    path = str(node["_target_"])
    module, _, name = path.rpartition(".")
    if module == "torchvision.transforms.v2" and not hasattr(v2, name):
        names = [n for n in dir(v2) if n[:1].isupper()]
        stems = [word[:4] for word in re.findall(r"[A-Z][a-z]+", name) if word != "Random"]
        close = difflib.get_close_matches(name, names, n=3) + [n for n in names if any(s in n for s in stems)]
        hint = f"; did you mean {', '.join(list(dict.fromkeys(close))[:4])}?" if close else ""
        raise UserError(f"{where}: torchvision.transforms.v2 has no transform {name!r}{hint} (e.g. {EXAMPLES})")
    try:
        locate(path)
    except UserError as e:
        raise UserError(f"{where}: {e}; transforms are torchvision.transforms.v2 classes (e.g. {EXAMPLES}) "
                        "or your own callables") from None


def _dtypes(kwargs: dict[str, Any]) -> dict[str, Any]:
    """'torch.float32' (a YAML string) as the dtype it names."""
    def value(v: Any) -> Any:
        named = getattr(torch, v[len("torch."):], None) if isinstance(v, str) and v.startswith("torch.") else None
        return named if isinstance(named, torch.dtype) else v
    return {k: value(v) for k, v in kwargs.items()}


def build_transforms(nodes: Any, key: str) -> v2.Compose | None:
    """``dataset.<key>`` (a list of nodes, or null) as one Compose; None when there is none."""
    if nodes is None:
        return None
    if isinstance(nodes, dict) or not isinstance(nodes, (list, tuple)):
        raise UserError(f"dataset.{key} must be a list of transform nodes (or null), e.g. "
                        f"[{{_target_: torchvision.transforms.v2.RandomHorizontalFlip}}]; got {nodes!r}")
    built = []
    for i, node in enumerate(nodes):
        where = f"dataset.{key}[{i}]"
        node = plain(node) if not isinstance(node, dict) and hasattr(node, "keys") else node
        if not isinstance(node, dict) or "_target_" not in node:
            raise UserError(f"{where} must be a node with a _target_ (a torchvision.transforms.v2 class, e.g. "
                            f"{{_target_: torchvision.transforms.v2.RandomHorizontalFlip}}); got {node!r}")
        _check_target(node, where)
        target, kwargs = checked_kwargs(node, where)
        try:
            built.append(target(**_dtypes(kwargs)))
        except (TypeError, ValueError) as e:
            raise UserError(f"{where} ({node['_target_']}): {str(e).splitlines()[0]}") from None
    return v2.Compose(built) if built else None


class Transforms:
    """One split's transforms, applied to one image under its seed (see the module docstring)."""

    def __init__(self, nodes: Any = None, key: str = "train_transforms") -> None:
        self.key = key
        self.pipeline = build_transforms(nodes, key)

    @property
    def active(self) -> bool:
        return self.pipeline is not None

    def __call__(self, image: Tensor, seed: int, source: object = "") -> Tensor:
        """``image`` transformed under ``seed``; ``source`` (its file) is named if that fails."""
        if self.pipeline is None:
            return image
        what = f"{source} ({describe(image)})" if source else describe(image)
        try:
            with seeded(seed, image.device):
                out = self.pipeline(image)
        except UserError:
            raise
        except Exception as e:  # a transform that cannot take this image: one line, at the first item
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            hint = (" (put {_target_: torchvision.transforms.v2.ToDtype, dtype: torch.float32, scale: true} before it)"
                    if "float" in text and image.dtype == torch.uint8 else "")
            raise UserError(f"dataset.{self.key} cannot transform {what}: {type(e).__name__}: {text}{hint}") from None
        if not isinstance(out, Tensor) or out.dim() != 3 or out.shape[0] != image.shape[0]:
            got = describe(out) if isinstance(out, Tensor) else f"a {type(out).__name__}"
            raise UserError(f"dataset.{self.key} turned {what} into {got}; they must return an image tensor "
                            f"[C, H, W] with its {image.shape[0]} channel(s)")
        return out


def describe(image: Tensor) -> str:
    """'an 8-bit image of shape (3, 20, 20)', 'a float32 image of shape ...'."""
    kind = "an 8-bit" if image.dtype == torch.uint8 else "a " + str(image.dtype).replace("torch.", "")
    return f"{kind} image of shape {tuple(image.shape)}"


def fit_size(image: Tensor, size: int) -> Tensor:
    """The image at ``size`` x ``size`` (antialiased; untouched when it is that size already)."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    return resize(image, [size, size], antialias=True)


def check_first(dataset: Dataset) -> None:
    """Make the first item (and, for a dataset that finishes batches on the device, its batch,
    here on the CPU) so that transforms that cannot work stop the run at start-up."""
    item = dataset[0]
    collate, to_device = getattr(dataset, "collate", None), getattr(dataset, "to_device", None)
    if collate is not None and to_device is not None:
        to_device(collate([item]), torch.device("cpu"))


def without_augmentation(dataset: object, attribute: str) -> object:
    """A shallow copy of ``dataset`` whose ``attribute`` (its Transforms) does nothing: the same
    images, brought to the model's size as always, never randomly changed (trainer.overfit_batches)."""
    import copy

    plain = copy.copy(dataset)
    setattr(plain, attribute, Transforms())
    return plain
