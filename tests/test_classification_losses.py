"""Single-label losses against PyTorch, torchvision's sigmoid focal loss (the two-class case),
the focal formula written out, and hand-computed class weights; gradients at extreme logits."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from runner.errors import UserError
from runner.losses import classification as cl


def _data(seed: int = 0, b: int = 32, classes: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(b, classes, generator=g), torch.randint(0, classes, (b,), generator=g)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(smoothing):
    x, y = _data()
    loss = cl.softmax_cross_entropy(label_smoothing=smoothing)(x, y)
    assert loss.shape == (32,)
    reference = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)(x, y)
    assert torch.allclose(loss.mean(), reference, atol=1e-6)
    if smoothing:  # PyTorch's definition, written out: (1 - eps) on the true class + eps / C on each
        log_p = F.log_softmax(x, 1)
        by_hand = -(1 - smoothing) * log_p.gather(1, y[:, None]).squeeze(1) - smoothing * log_p.mean(1)
        assert torch.allclose(loss, by_hand, atol=1e-5)


def test_balanced_class_weights_by_hand(caplog):
    counts = [50, 25, 10, 15]  # N = 100, C = 4
    weights = cl.balanced_class_weights(counts)
    assert weights.tolist() == pytest.approx([100 / (4 * c) for c in counts])
    # Mean weight over the training samples is 1: the loss keeps its scale.
    assert sum(w * c for w, c in zip(weights.tolist(), counts)) / 100 == pytest.approx(1.0)
    with caplog.at_level(logging.WARNING, logger="runner"):
        empty = cl.balanced_class_weights([60, 0, 40], ["cat", "dog", "eel"])
    assert empty.tolist() == pytest.approx([100 / 180, 1.0, 100 / 120])
    assert [r.message for r in caplog.records if "dog" in r.message and "no training example" in r.message]


def test_weighted_cross_entropy_is_the_per_sample_weighted_term():
    x, y = _data(1, classes=4)
    counts = [50, 25, 10, 15]
    loss = cl.weighted_cross_entropy(counts)(x, y)
    w = torch.tensor([100 / (4 * c) for c in counts])
    reference = torch.nn.CrossEntropyLoss(weight=w, reduction="none")(x, y)
    assert torch.allclose(loss, reference, atol=1e-6)
    assert torch.allclose(loss, w[y] * F.cross_entropy(x, y, reduction="none"), atol=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_matches_the_formula_and_torchvision_with_two_classes(gamma):
    x, y = _data(2)
    ours = cl.softmax_focal(gamma=gamma)(x, y)
    p = F.softmax(x.double(), 1).gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(ours.double(), -(1 - p) ** gamma * torch.log(p), atol=1e-5)
    # Two classes: softmax over (0, z) is sigmoid(z), so this is torchvision's sigmoid focal loss.
    z, t = _data(3, classes=1)[0].squeeze(1), torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(3))
    two = cl.softmax_focal(gamma=gamma)(torch.stack([torch.zeros_like(z), z], 1), t)
    assert torch.allclose(two, sigmoid_focal_loss(z, t.float(), alpha=-1, gamma=gamma, reduction="none"), atol=1e-5)


def test_focal_gamma_zero_is_cross_entropy_and_alpha_weights_classes():
    x, y = _data(4, classes=3)
    assert torch.allclose(cl.softmax_focal(gamma=0.0)(x, y), F.cross_entropy(x, y, reduction="none"), atol=1e-6)
    alpha = [0.2, 1.0, 3.0]
    weighted = cl.softmax_focal(gamma=2.0, alpha=alpha, class_counts=[1, 1, 1])(x, y)
    assert torch.allclose(weighted, torch.tensor(alpha)[y] * cl.softmax_focal(gamma=2.0)(x, y), atol=1e-6)
    balanced = cl.softmax_focal(gamma=2.0, alpha="balanced", class_counts=[10, 20, 70])(x, y)
    w = torch.tensor([100 / 30, 100 / 60, 100 / 210])
    assert torch.allclose(balanced, w[y] * cl.softmax_focal(gamma=2.0)(x, y), atol=1e-5)
    with pytest.raises(UserError, match="2 values; the dataset has 3 classes"):
        cl.softmax_focal(alpha=[1.0, 2.0], class_counts=[1, 1, 1])
    with pytest.raises(UserError, match="allowed: null, balanced"):
        cl.softmax_focal(alpha="inverse")
    with pytest.raises(UserError, match="label_smoothing"):
        cl.softmax_cross_entropy(label_smoothing=1.5)


@pytest.mark.parametrize("make", [lambda: cl.softmax_cross_entropy(0.1), lambda: cl.weighted_cross_entropy([1, 2, 3]),
                                  lambda: cl.softmax_focal(gamma=0.5), lambda: cl.softmax_focal(gamma=2.0)])
def test_finite_values_and_gradients_at_extreme_logits(make):
    x = torch.tensor([[100.0, -100.0, 0.0], [-100.0, 100.0, 0.0], [0.0, 0.0, 1e-3]], requires_grad=True)
    y = torch.tensor([0, 0, 2])  # right and sure, wrong and sure, unsure
    loss = make()(x, y)
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert loss[1] > 50 and loss[1] > 5 * loss[0]  # a confident mistake costs about the logit gap
