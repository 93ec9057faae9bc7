"""Multi-label losses against independent references: torchvision, PyTorch's BCE, the ASL
authors' formula written out literally, hand-computed weights; gradients at extreme logits."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from runner.errors import UserError
from runner.losses import multilabel as ml
from runner.losses.interval import interval_from_config, interval_penalty

PRACTITIONERS_COUNTS = [19000, 65000, 38000, 105000]
PRACTITIONERS_N = 224000


def _data(seed: int = 0, b: int = 16, labels: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 4 * torch.randn(b, labels, generator=g), (torch.rand(b, labels, generator=g) < 0.3).float()


def test_pos_weight_from_practitioners_counts():
    weights = ml.pos_weight_from_counts(PRACTITIONERS_COUNTS, PRACTITIONERS_N)
    assert weights.tolist() == pytest.approx([10.79, 2.45, 4.90, 1.13], abs=0.01)
    assert weights.tolist() == pytest.approx([205 / 19, 159 / 65, 186 / 38, 119 / 105], rel=1e-6)


def test_bce_and_pos_weight_match_torch():
    x, y = _data()
    assert torch.allclose(ml.bce()(x, y).mean(), F.binary_cross_entropy_with_logits(x, y), atol=1e-6)
    loss = ml.bce_pos_weight(PRACTITIONERS_COUNTS, PRACTITIONERS_N)
    reference = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([205 / 19, 159 / 65, 186 / 38, 119 / 105]))
    per_sample = loss(x, y)
    assert per_sample.shape == (16,)
    assert torch.allclose(per_sample.mean(), reference(x, y), atol=1e-5)


def test_inverse_frequency_weights_by_hand():
    weights = ml.inverse_frequency_weights(PRACTITIONERS_COUNTS, PRACTITIONERS_N)
    raw = [PRACTITIONERS_N / c for c in PRACTITIONERS_COUNTS]
    assert weights.tolist() == pytest.approx([4 * r / sum(raw) for r in raw], rel=1e-6)
    assert float(weights.sum()) == pytest.approx(4.0)
    x, y = _data()
    expected = (F.binary_cross_entropy_with_logits(x, y, reduction="none") * weights).mean(1)
    assert torch.allclose(ml.bce_inverse_freq(PRACTITIONERS_COUNTS, PRACTITIONERS_N)(x, y), expected, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.25, 0.8, -1])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_matches_torchvision(alpha, gamma):
    x, y = _data(1)
    ours = ml.focal(gamma=gamma, alpha=None if alpha < 0 else alpha)(x, y)
    reference = sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma, reduction="none").mean(1)
    assert torch.allclose(ours, reference, atol=1e-6)


def test_focal_per_label_alpha():
    x, y = _data(2)
    alpha = [0.1, 0.3, 0.6, 0.9]
    ours = ml.focal(gamma=2.0, alpha=alpha)(x, y)
    reference = torch.stack(
        [sigmoid_focal_loss(x[:, j], y[:, j], alpha=a, gamma=2.0, reduction="none") for j, a in enumerate(alpha)], 1
    ).mean(1)
    assert torch.allclose(ours, reference, atol=1e-6)
    with pytest.raises(UserError, match="3 values"):
        ml.focal(alpha=[0.1, 0.2, 0.3], pos_counts=[1, 2, 3, 4])


def _asl_reference(x, y, gamma_neg, gamma_pos, clip, eps):
    """The authors' AsymmetricLoss (github.com/Alibaba-MIIL/ASL, losses.py), per element, float64."""
    x, y = x.double(), y.double()
    xs_pos = torch.sigmoid(x)
    xs_neg = 1 - xs_pos
    if clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    loss = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
    pt = xs_pos * y + xs_neg * (1 - y)
    loss = loss * torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
    return -loss


@pytest.mark.parametrize("gamma_neg,gamma_pos,clip", [(4.0, 1.0, 0.05), (2.0, 0.0, 0.0), (0.0, 0.0, 0.0), (3.0, 2.0, 0.2)])
def test_asl_matches_the_authors_formula(gamma_neg, gamma_pos, clip):
    x, y = _data(3, b=32)
    ours = ml.asl(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=1e-8)(x, y)
    reference = _asl_reference(x, y, gamma_neg, gamma_pos, clip, 1e-8).mean(1).float()
    assert torch.allclose(ours, reference, atol=1e-5)


def test_asl_hand_computed():
    # One negative at logit 0 (p = 0.5), clip 0.1, gamma_neg 2: p_m = 0.4, loss = 0.4^2 * -log(0.6).
    # One positive at logit 0, gamma_pos 1: loss = 0.5 * -log(0.5).
    loss = ml.asl(gamma_neg=2.0, gamma_pos=1.0, clip=0.1, eps=1e-8)
    value = loss(torch.zeros(1, 2), torch.tensor([[0.0, 1.0]]))
    assert float(value) == pytest.approx((0.16 * -math.log(0.6) + 0.5 * math.log(2)) / 2, rel=1e-6)
    # A negative below the clip contributes nothing.
    assert float(loss(torch.tensor([[-5.0]]), torch.tensor([[0.0]]))) == 0.0


def test_class_balanced_hand_computed():
    counts, beta = [10, 100, 1000], 0.99
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    expected = [3 * r / sum(raw) for r in raw]
    assert ml.class_balanced_weights(counts, beta).tolist() == pytest.approx(expected, rel=1e-6)
    x, y = _data(4, labels=3)
    w = torch.tensor(expected)
    bce = ml.class_balanced(counts, beta=beta, base="bce")(x, y)
    assert torch.allclose(bce, (F.binary_cross_entropy_with_logits(x, y, reduction="none") * w).mean(1), atol=1e-6)
    focal = ml.class_balanced(counts, beta=beta, base="focal", gamma=2.0)(x, y)
    reference = (sigmoid_focal_loss(x, y, alpha=-1, gamma=2.0, reduction="none") * w).mean(1)
    assert torch.allclose(focal, reference, atol=1e-6)
    with pytest.raises(UserError, match="focal, bce"):
        ml.class_balanced(counts, base="hinge")


def test_a_label_without_positives_gets_a_neutral_weight_and_one_warning(caplog):
    counts, n = [0, 10, 40], 100
    with caplog.at_level(logging.WARNING, logger="runner"):
        pos_weight = ml.bce_pos_weight(counts, n, label_names=["rare", "b", "c"]).pos_weight
        inverse = ml.bce_inverse_freq(counts, n, label_names=["rare", "b", "c"]).label_weight
        balanced = ml.class_balanced(counts, beta=0.99, label_names=["rare", "b", "c"]).label_weight
    assert pos_weight.tolist() == pytest.approx([1.0, 9.0, 1.5])  # not N - 1 = 99
    raw = [(10 + 2.5) / 2, 10, 2.5]  # N / n_l, the empty label at the others' mean
    assert inverse.tolist() == pytest.approx([3 * r / sum(raw) for r in raw])
    effective = [(1 - 0.99) / (1 - 0.99**c) for c in (10, 40)]
    raw = [sum(effective) / 2, *effective]
    assert balanced.tolist() == pytest.approx([3 * r / sum(raw) for r in raw], rel=1e-6)
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and all("label rare has no positive training example" in w for w in warnings)


def test_the_multilabel_family_names_the_label_in_the_warning(caplog):
    from runner.engine.family import DataBundle
    from runner.families.multilabel import build

    labels = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
    bundle = DataBundle("multilabel", None, None, None, info={"num_labels": 2, "label_names": ["bag", "dress"],
                                                              "train_labels": labels, "prevalence": [0.0, 0.67]})
    with caplog.at_level(logging.WARNING, logger="runner"):
        family = build(bundle, {"_target_": "torch.nn.Identity"},
                       {"_target_": "runner.losses.multilabel.bce_pos_weight"})
    assert family.loss.pos_weight.tolist() == pytest.approx([1.0, 0.5])
    assert any("label bag has no positive" in r.message for r in caplog.records)


def test_class_balanced_beta_follows_the_sample_count(caplog):
    """beta=0.999 saturates at the practitioners' counts (every weight 1.0000); beta=null takes
    (N - 1) / N, which spreads the weights as the paper intends."""
    saturated = ml.class_balanced_weights(PRACTITIONERS_COUNTS, 0.999)
    assert saturated.tolist() == pytest.approx([1.0] * 4, abs=1e-4)
    with caplog.at_level(logging.INFO, logger="runner"):
        loss = ml.class_balanced(PRACTITIONERS_COUNTS, num_samples=PRACTITIONERS_N, label_names=list("abcd"))
    beta = (PRACTITIONERS_N - 1) / PRACTITIONERS_N
    raw = [(1 - beta) / (1 - beta**c) for c in PRACTITIONERS_COUNTS]
    assert loss.label_weight.tolist() == pytest.approx([4 * r / sum(raw) for r in raw], rel=1e-5)
    assert float(loss.label_weight[0] / loss.label_weight[3]) > 4  # rarest vs commonest label
    logged = [r.message for r in caplog.records if r.message.startswith("class_balanced:")]
    assert len(logged) == 1 and "beta=0.9999955" in logged[0] and "a 1.94" in logged[0]
    explicit = ml.class_balanced(PRACTITIONERS_COUNTS, beta=0.999, num_samples=PRACTITIONERS_N).label_weight
    assert torch.allclose(explicit, saturated)
    with pytest.raises(UserError, match="loss.beta=null"):
        ml.class_balanced(PRACTITIONERS_COUNTS)


def test_interval_penalty_hand_computed():
    values = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.5])
    assert interval_penalty(values, -1.0, 1.0).tolist() == pytest.approx([4.0, 0.0, 0.0, 0.0, 2.25])
    logits = torch.tensor([[-3.0, 0.0], [0.0, 2.5]])
    penalty = interval_from_config({"low": -1.0, "high": 1.0, "weight": 0.5})
    assert penalty(logits).tolist() == pytest.approx([0.5 * 4.0 / 2, 0.5 * 2.25 / 2])
    on_probs = interval_from_config({"low": 0.2, "high": 0.8, "on": "probabilities"})
    p = torch.sigmoid(torch.tensor(3.0)).item()
    assert on_probs(torch.tensor([[3.0, 0.0]])).item() == pytest.approx((p - 0.8) ** 2 / 2, rel=1e-5)
    # As an extra term of a loss: it adds to the per-sample loss.
    x, y = _data(5)
    with_term = ml.bce(interval={"low": -1.0, "high": 1.0, "weight": 0.1})(x, y)
    expected = ml.bce()(x, y) + 0.1 * interval_penalty(x, -1.0, 1.0).mean(1)
    assert torch.allclose(with_term, expected, atol=1e-6)


def test_interval_config_errors():
    with pytest.raises(UserError, match="loss.interval.hgih"):
        interval_from_config({"low": 0.0, "hgih": 1.0})
    with pytest.raises(UserError, match="low < high"):
        interval_from_config({"low": 1.0, "high": 0.0})
    with pytest.raises(UserError, match="logits, probabilities"):
        interval_from_config({"low": 0.0, "high": 1.0, "on": "probs"})


ALL_LOSSES = {
    "bce": lambda: ml.bce(),
    "bce_pos_weight": lambda: ml.bce_pos_weight(PRACTITIONERS_COUNTS, PRACTITIONERS_N),
    "bce_inverse_freq": lambda: ml.bce_inverse_freq(PRACTITIONERS_COUNTS, PRACTITIONERS_N),
    "focal": lambda: ml.focal(gamma=2.0, alpha=0.25),
    "focal_gamma_half": lambda: ml.focal(gamma=0.5),
    "asl": lambda: ml.asl(),
    "asl_gamma_below_one": lambda: ml.asl(gamma_neg=0.5, gamma_pos=0.5, clip=0.05, eps=0.0),
    "asl_no_clip": lambda: ml.asl(clip=0.0),
    "class_balanced": lambda: ml.class_balanced(PRACTITIONERS_COUNTS, num_samples=PRACTITIONERS_N),
    "interval_probs": lambda: ml.bce(interval={"low": 0.1, "high": 0.9, "on": "probabilities"}),
}


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_finite_values_and_gradients_at_extreme_logits(name):
    x = torch.tensor([[100.0, -100.0, 100.0, -100.0], [0.0, 30.0, -30.0, 1e-3]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    loss = ALL_LOSSES[name]()(x, y)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()
    # Confidently wrong predictions (+100 for a negative, -100 for a positive) cost a lot.
    assert loss[0] > 1.0


def test_per_sample_mean_equals_elementwise_mean():
    x, y = _data(6)
    for make in ALL_LOSSES.values():
        loss = make()
        if loss.interval is None:
            assert torch.allclose(loss(x, y).mean(), loss.elementwise(x, y).mul(
                1 if loss.label_weight is None else loss.label_weight).mean(), atol=1e-6)
