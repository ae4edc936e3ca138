"""Pieces of the training loop that can be checked without training: augmentation, split, optimisers."""

import pytest
import torch

from training import models
from training.data import MNIST
from training.train import TrainConfig, augment, make_optimizer, make_schedule, split


def test_augment_keeps_digits_upright_and_in_frame():
    x = torch.zeros(256, 1, 28, 28)
    x[:, :, 8:20, 6:10] = 1.0  # a bar in the left half
    out = augment(x, hflip=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    left, right = out[..., :14].sum((1, 2, 3)), out[..., 14:].sum((1, 2, 3))
    assert (left > right).all()  # +-10 deg, +-2 px, scale 0.9-1.1 never moves it across the middle
    ratio = out.sum((1, 2, 3)) / x.sum((1, 2, 3))
    assert ratio.min() > 0.7 and ratio.max() < 1.3  # scale 0.9-1.1: area changes by at most ~20%


def test_hflip_mirrors_some():
    x = torch.zeros(256, 1, 28, 28)
    x[:, :, 8:20, 6:10] = 1.0
    out = augment(x, hflip=True, generator=torch.Generator().manual_seed(0))
    mirrored = (out[..., 14:].sum((1, 2, 3)) > out[..., :14].sum((1, 2, 3))).float().mean()
    assert 0.3 < mirrored < 0.7


def fake_mnist(n=1000):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8).numpy()
    labels = (torch.arange(n) % 10).numpy()
    return MNIST(images, labels, images[:10], labels[:10])


def test_split_is_seeded_and_disjoint():
    mnist = fake_mnist()
    a = split(mnist, TrainConfig(val_size=100, seed=1))
    b = split(mnist, TrainConfig(val_size=100, seed=1))
    c = split(mnist, TrainConfig(val_size=100, seed=2))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[3], c[3])
    assert len(a[0]) == 900 and len(a[2]) == 100


def test_train_limit_caps_validation_at_a_tenth():
    x_train, _, x_val, _ = split(fake_mnist(), TrainConfig(train_limit=500))
    assert (len(x_train), len(x_val)) == (450, 50)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("schedule", ["none", "plateau", "onecycle"])
def test_optimizers_and_schedules(name, schedule):
    model = models.build("keras")
    cfg = TrainConfig(optimizer=name, schedule=schedule, amsgrad=name != "sgd", weight_decay=1e-4)
    opt = make_optimizer(model, cfg)
    sched = make_schedule(opt, cfg, steps_per_epoch=10)
    assert (sched is None) == (schedule == "none")
