"""DenseNet121 head and local weights, and the family: a few optimizer steps lower the loss."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from runner.data import shapes
from runner.errors import UserError
from runner.families import multilabel
from runner.models.torchvision_models import build as torchvision_model


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two threads per process spin against the
    other processes' threads and a DenseNet step gets ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_densenet_head_and_small_inputs():
    model = torchvision_model("densenet121", num_outputs=4).eval()
    assert model.classifier.out_features == 4
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert torchvision_model("densenet121", 3, memory_efficient=True).features.denseblock1.denselayer1.memory_efficient


DENSENET = {"_target_": "runner.models.torchvision_models.build", "name": "densenet121"}


def _family(loss: dict, bundle):
    return multilabel.build(bundle, OmegaConf.create(DENSENET), OmegaConf.create(loss))


def test_family_passes_label_counts_to_the_loss():
    bundle = shapes.build(n_train=200, n_val=4, n_test=4)
    family = _family({"_target_": "runner.losses.multilabel.bce_pos_weight"}, bundle)
    labels = bundle.info["train_labels"]
    expected = (200 - labels.sum(0)) / labels.sum(0)
    assert torch.allclose(family.loss.pos_weight, expected)
    with pytest.raises(UserError, match="unknown key 'loss.gama'"):
        _family({"_target_": "runner.losses.multilabel.focal", "gama": 2.0}, bundle)


def test_a_few_optimizer_steps_lower_the_training_loss():
    torch.manual_seed(0)
    bundle = shapes.build(n_train=16, n_val=4, n_test=4)
    family = _family({"_target_": "runner.losses.multilabel.focal", "gamma": 2.0}, bundle)
    images, labels = bundle.train.tensors
    optimizer = torch.optim.Adam(family.model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss_sum, count = family.train_loss((images, labels))
        assert count == 16 and loss_sum.shape == ()
        optimizer.zero_grad()
        (loss_sum / count).backward()
        optimizer.step()
        losses.append(float(loss_sum.detach()) / count)
    assert losses[-1] < 0.5 * losses[0], losses
