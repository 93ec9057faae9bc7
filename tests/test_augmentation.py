"""Augmentation (dataset.train_transforms): each sample's draws follow from (trainer.seed, epoch,
position in the epoch's order), checked against the transforms applied by hand under that seed;
two epochs differ, one seed repeats itself whatever the workers, a resumed or sharded loader
draws what the uninterrupted single process drew, the main process's RNG is left alone; a
SIGKILLed run resumed with augmentation on is bitwise the uninterrupted one; bad lists exit 2."""
from __future__ import annotations


import pytest
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from conftest import SHARED_DATA, compose, require
from runner import run
from runner.config.build import build
from runner.data import mnist_classes, multilabel_csv
from runner.engine import data as loaders
from runner.errors import UserError
from test_classification_data import write_image_folder
from test_multilabel_data import jpeg_and_png_folder
from test_resume_exact import assert_killed_and_resumed_run_is_bitwise_identical

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SIZE = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("aug") / "data", {"train": 8, "val": 2, "test": 2}, size=20)


@pytest.fixture(scope="module")
def train_split(folder):
    """The imagefolder training split with the shipped default transforms (from the config)."""
    cfg = compose("experiment=classify", "dataset=imagefolder", f"dataset.root={folder}", f"dataset.image_size={SIZE}")
    return build(cfg.dataset, "dataset", device=None, num_workers=0).train


def epoch_images(dataset, epoch, seed=0, workers=0, skip=0, rank=0, world=1, batch=4):
    loader = loaders.train_loader(dataset, batch_size=batch, epoch=epoch, seed=seed, rank=rank, world=world,
                                  weights=None, prebatched=False, num_workers=workers, skip_batches=skip)
    return torch.cat([images for images, _ in loader])


def by_hand(path, seed):
    """The default training transforms applied without runner: seed, crop + flip, normalise."""
    image = decode_image(path, mode=ImageReadMode.RGB)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image = v2.Compose([v2.RandomResizedCrop(SIZE), v2.RandomHorizontalFlip()])(image)
    return F.normalize(F.to_dtype(image, torch.float32, scale=True), MEAN, STD)


def test_each_sample_is_augmented_under_its_own_seed_and_two_epochs_differ(train_split):
    before = torch.get_rng_state()
    epochs = [epoch_images(train_split, epoch) for epoch in (0, 1)]
    assert torch.equal(torch.get_rng_state(), before)  # num_workers=0: the global RNG is left alone
    n = len(train_split)
    for epoch, images in enumerate(epochs):
        order = loaders.train_order(n, 0, epoch)
        for position in (0, 5, n - 1):
            path = train_split.samples[int(order[position])][0]
            torch.testing.assert_close(images[position], by_hand(path, loaders.item_seed(0, epoch, position)),
                                       rtol=0, atol=0)
    # The same file in both epochs: other crops (the flip alone could coincide).
    where = [{int(i): p for p, i in enumerate(loaders.train_order(n, 0, e))} for e in (0, 1)]
    differ = [not torch.equal(epochs[0][where[0][i]], epochs[1][where[1][i]]) for i in range(n)]
    assert all(differ), differ


def test_one_seed_gives_the_same_batches_whatever_the_workers_and_the_resume_point(train_split):
    reference = epoch_images(train_split, 0)
    assert torch.equal(epoch_images(train_split, 0, workers=2), reference)
    assert not torch.equal(epoch_images(train_split, 0, seed=1), reference)
    # A run resumed after 2 batches (new workers) continues with the uninterrupted run's images.
    assert torch.equal(epoch_images(train_split, 0, workers=2, skip=2), reference[8:])
    # Two processes at half the batch draw what one process draws: rank r holds positions r, r+2, ...
    for rank in (0, 1):
        assert torch.equal(epoch_images(train_split, 0, rank=rank, world=2, batch=2), reference[rank::2])


def test_evaluation_items_are_resized_and_normalised_only(folder):
    cfg = compose("experiment=classify", "dataset=imagefolder", f"dataset.root={folder}", f"dataset.image_size={SIZE}")
    bundle = build(cfg.dataset, "dataset", device=None, num_workers=0)
    path, label = bundle.val.samples[1]
    image, got_label = bundle.val[1]
    plain = F.resize(decode_image(path, mode=ImageReadMode.RGB), [SIZE, SIZE], antialias=True)
    torch.testing.assert_close(image, F.normalize(F.to_dtype(plain, torch.float32, scale=True), MEAN, STD),
                               rtol=0, atol=0)
    assert got_label == label and not bundle.val.seeded_items and bundle.train.seeded_items


def test_csv_images_augmented_the_same_by_workers_and_by_decode_on_device(tmp_path):
    """multilabel_csv: the seeds travel with the JPEG bytes, so transforms applied after a batched
    decode (decode=device, here on the CPU) equal those the workers apply (decode=cpu)."""
    folder, csv = jpeg_and_png_folder(tmp_path, 9, same_size=True)
    crop = [{"_target_": "torchvision.transforms.v2.RandomResizedCrop", "size": SIZE},
            {"_target_": "torchvision.transforms.v2.ColorJitter", "brightness": 0.4}]
    batches = {}
    for decode, workers in (("cpu", 0), ("cpu", 2), ("device", 2)):
        dataset = multilabel_csv.build(csv=csv, image_dir=str(folder), image_size=SIZE, decode=decode,
                                       train_transforms=crop).train
        loader = loaders.train_loader(dataset, batch_size=4, epoch=0, seed=3, rank=0, world=1, weights=None,
                                      prebatched=False, num_workers=workers)
        move = loaders.batch_mover(dataset, None, torch.device("cpu"))
        batches[decode, workers] = torch.cat([move(batch)[0] for batch in loader])
    assert batches["cpu", 0].shape == (9, 3, SIZE, SIZE)
    assert torch.equal(batches["cpu", 2], batches["cpu", 0]) and torch.equal(batches["device", 2], batches["cpu", 0])


def test_mnist_training_split_with_transforms_is_made_per_item_and_eval_stays_in_tensors():
    root = require(SHARED_DATA / "mnist")
    crop = [{"_target_": "torchvision.transforms.v2.RandomCrop", "size": 28, "padding": 4}]
    bundle = mnist_classes.mnist(str(root), n_val=100, train_transforms=crop)
    assert bundle.train.seeded_items and hasattr(bundle.val, "tensors") and hasattr(bundle.test, "tensors")
    image, label = bundle.train[(7, 1234)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        expected = v2.RandomCrop(28, padding=4)(bundle.train.images[7])
    torch.testing.assert_close(image, (expected.float() / 255 - 0.1307) / 0.3081, rtol=0, atol=0)
    assert image.shape == (1, 28, 28) and int(label) == int(bundle.train.labels[7])
    with pytest.raises(UserError, match="trainer.data_on_device=true needs a dataset held in tensors"):
        loaders.resident(bundle.train, torch.device("cpu"))


@pytest.mark.parametrize("transforms, needle", [
    ("[{_target_:torchvision.transforms.v2.RandomFlipp}]",
     "dataset.train_transforms[0]: torchvision.transforms.v2 has no transform 'RandomFlipp'; did you mean"),
    ("[{_target_:torchvision.transforms.v2.RandomCrop,sise:8}]",
     "unknown key 'dataset.train_transforms[0].sise' (did you mean 'size'?); allowed keys of "
     "dataset.train_transforms[0]: fill"),
    ("[{_target_:torchvision.transforms.v2.Normalize,mean:[0.5],std:[0.2]}]",
     "dataset.train_transforms cannot transform"),
])
def test_a_bad_transform_list_exits_2_with_one_line(tmp_path, folder, transforms, needle):
    result = run(["experiment=classify", "dataset=imagefolder", f"dataset.root={folder}", "device=cpu",
                  "trainer.progress=none", f"dataset.train_transforms={transforms}", f"output_root={tmp_path}"])
    assert result["exit_code"] == 2 and result["status"] == "failed", result
    assert needle in result["error"] and "\n" not in result["error"], result["error"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_with_augmentation_is_bitwise_identical(tmp_path):
    """tests/test_resume_exact.py's check with an ImageFolder, the default crop + flip and 2 workers."""
    data = write_image_folder(tmp_path / "data", {"train": 16, "val": 3, "test": 3}, size=20)
    overrides = ["experiment=classify", "dataset=imagefolder", f"dataset.root={data}", f"dataset.image_size={SIZE}",
                 "model.width=8", "trainer.batch_size=8", "trainer.max_epochs=3", "trainer.eval_batch_size=32",
                 "device=cpu", "trainer.deterministic=true", "trainer.num_workers=2", "trainer.ckpt_every_n_steps=1",
                 "trainer.log_every_n_steps=1", "trainer.progress=none"]
    assert_killed_and_resumed_run_is_bitwise_identical(tmp_path, overrides)