"""The embedded procedural silhouette set: binary 28x28 shapes drawn from a dataset seed.

Each image holds one or two filled shapes (ellipse, rectangle or triangle) at a random
position, size and rotation, object pixels = 1. Everything is vectorised in torch over the
whole set, so ten thousand images take a fraction of a second and the same seed always gives
the same images on every machine (a CPU ``torch.Generator`` drives all the draws).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

SIDE = 28


def _pose(n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Centre (cx, cy) in [-0.45, 0.45] and rotation (cos, sin) of ``n`` shapes."""
    centre = (torch.rand(n, 2, generator=g) - 0.5) * 0.9
    angle = torch.rand(n, generator=g) * math.pi
    return centre[:, 0], centre[:, 1], torch.cos(angle), torch.sin(angle)


def _local_coords(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in each shape's rotated frame: two [n, 28, 28] tensors."""
    axis = (torch.arange(SIDE, dtype=torch.float32) + 0.5) / SIDE * 2 - 1  # [-1, 1]
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    cx, cy, cos, sin = (v[:, None, None] for v in _pose(n, g))
    dx, dy = x - cx, y - cy
    return cos * dx + sin * dy, -sin * dx + cos * dy


def _shapes(n: int, g: torch.Generator) -> Tensor:
    """``n`` boolean [28, 28] masks, each one shape of a random kind."""
    u, v = _local_coords(n, g)
    a = (0.2 + 0.45 * torch.rand(n, 1, 1, generator=g))  # half-width
    b = (0.2 + 0.45 * torch.rand(n, 1, 1, generator=g))  # half-height
    ellipse = (u / a) ** 2 + (v / b) ** 2 <= 1
    rectangle = (u.abs() <= a) & (v.abs() <= b)
    # Isosceles triangle, apex at (0, -b), base from (-a, b) to (a, b): inside when below the
    # apex-to-corner edges and above the base.
    triangle = (v <= b) & (u.abs() * 2 * b <= a * (v + b))
    kind = torch.randint(0, 3, (n, 1, 1), generator=g)
    return torch.where(kind == 0, ellipse, torch.where(kind == 1, rectangle, triangle))


def make_silhouettes(n: int, seed: int, two_shape_fraction: float = 0.3) -> Tensor:
    """``n`` binary images as a float tensor [n, 784] (object = 1), fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    first = _shapes(n, g)
    second = _shapes(n, g)
    use_second = torch.rand(n, 1, 1, generator=g) < two_shape_fraction
    images = first | (second & use_second)
    return images.reshape(n, SIDE * SIDE).float()
