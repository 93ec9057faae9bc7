"""A torchvision ResNet with the stem for small images (``model=cifar_resnet``): the first
convolution becomes 3x3 with stride 1 and the max-pool is removed, as in He et al.'s CIFAR
experiments and most CIFAR / Fashion-MNIST ResNet-18 recipes. torchvision's ImageNet stem
(7x7 stride 2, then a stride-2 max-pool) would shrink a 28 px image to 7 px before the first
block and 1 px at the last stage.

The first convolution takes the data's channel count (``in_channels``, supplied by the family),
so grey images need no repeating. Any torchvision ResNet or ResNeXt (``model.name``) works; with
``model.weights`` the rest of the network is pretrained and the new stem starts from scratch.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from runner.errors import UserError
from runner.models.torchvision_models import build as build_torchvision


def build(num_outputs: int, name: str = "resnet18", in_channels: int = 3, weights: str | None = None,
          download: bool = False, **kwargs: Any) -> nn.Module:
    model = build_torchvision(name, num_outputs, weights=weights, download=download, **kwargs)
    if not isinstance(getattr(model, "conv1", None), nn.Conv2d) or not hasattr(model, "maxpool"):
        raise UserError(f"model.name={name!r}: model=cifar_resnet needs a ResNet (resnet18, resnet34, resnet50, "
                        "resnext50_32x4d, wide_resnet50_2, ...); other models: model=torchvision")
    model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    model.maxpool = nn.Identity()
    return model
