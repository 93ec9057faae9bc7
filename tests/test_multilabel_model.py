"""DenseNet121 head and local weights, and the family: a few optimizer steps lower the loss."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from runner.data import shapes
from runner.errors import UserError
from runner.families import multilabel
from runner.models.densenet import densenet121


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two threads per process spin against the
    other processes' threads and a DenseNet step gets ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_densenet_head_and_small_inputs():
    model = densenet121(num_labels=4).eval()
    assert model.classifier.out_features == 4
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert densenet121(num_labels=3, memory_efficient=True).features.denseblock1.denselayer1.memory_efficient


def test_densenet_loads_a_local_imagenet_style_state_dict(tmp_path):
    from torchvision.models import densenet121 as tv_densenet121

    imagenet_like = tv_densenet121(weights=None)  # 1000-class head, as the ImageNet file has
    path = tmp_path / "densenet121.pth"
    torch.save(imagenet_like.state_dict(), path)
    model = densenet121(num_labels=5, weights_path=str(path))
    assert torch.equal(model.features.conv0.weight, imagenet_like.features.conv0.weight)
    assert model.classifier.out_features == 5
    with pytest.raises(UserError, match="model.weights_path=.*no such file"):
        densenet121(num_labels=5, weights_path=str(tmp_path / "absent.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable state dict"):
        densenet121(num_labels=5, weights_path=str(tmp_path / "junk.pth"))


def _cfg(loss: dict) -> OmegaConf:
    return OmegaConf.create({"model": {"_target_": "runner.models.densenet.densenet121"}, "loss": loss})


def test_family_passes_label_counts_to_the_loss():
    bundle = shapes.build(n_train=200, n_val=4, n_test=4)
    family = multilabel.build(_cfg({"_target_": "runner.losses.multilabel.bce_pos_weight"}), bundle)
    labels = bundle.info["train_labels"]
    expected = (200 - labels.sum(0)) / labels.sum(0)
    assert torch.allclose(family.loss.pos_weight, expected)
    with pytest.raises(UserError, match="unknown key 'loss.gama'"):
        multilabel.build(_cfg({"_target_": "runner.losses.multilabel.focal", "gama": 2.0}), bundle)


def test_a_few_optimizer_steps_lower_the_training_loss():
    torch.manual_seed(0)
    bundle = shapes.build(n_train=16, n_val=4, n_test=4)
    family = multilabel.build(_cfg({"_target_": "runner.losses.multilabel.focal", "gamma": 2.0}), bundle)
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
