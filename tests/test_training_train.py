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
    """Random images whose first two pixels spell their index, so a split can be traced back."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    images[:, 0, 0], images[:, 0, 1] = torch.arange(n) % 256, torch.arange(n) // 256
    labels = (torch.arange(n) % 10).numpy()
    return MNIST(images.numpy(), labels, images[:10].numpy(), labels[:10])


def indices(x: torch.Tensor) -> list[int]:
    """The index of each image in the fake set, read back from its first two pixels."""
    pixels = (x[:, 0, 0, :2] * 255).round().long()
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


def test_split_is_seeded_and_disjoint():
    mnist = fake_mnist()
    a = split(mnist, TrainConfig(val_size=100, seed=1))
    b = split(mnist, TrainConfig(val_size=100, seed=1))
    c = split(mnist, TrainConfig(val_size=100, seed=2))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert set(indices(a[2])) != set(indices(c[2]))
    train_part, val_part = set(indices(a[0])), set(indices(a[2]))
    assert (len(train_part), len(val_part)) == (900, 100)
    assert not train_part & val_part and train_part | val_part == set(range(1000))
    assert a[1].tolist() == [i % 10 for i in indices(a[0])]  # each label stays with its image


def test_train_limit_caps_validation_at_a_tenth():
    x_train, _, x_val, _ = split(fake_mnist(), TrainConfig(train_limit=500))
    assert (len(x_train), len(x_val)) == (450, 50)
    assert set(indices(x_train)) | set(indices(x_val)) == set(range(500))


@pytest.mark.parametrize(
    "name, kind", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)]
)
def test_optimizer_is_built_as_configured(name, kind):
    cfg = TrainConfig(optimizer=name, lr=0.01, weight_decay=1e-4, momentum=0.8, amsgrad=name != "sgd")
    opt = make_optimizer(models.build("keras"), cfg)
    group = opt.param_groups[0]
    assert type(opt) is kind and (group["lr"], group["weight_decay"]) == (0.01, 1e-4)
    if name == "sgd":
        assert group["nesterov"] and group["momentum"] == 0.8
    else:
        assert group["amsgrad"]


def lrs_over(cfg: TrainConfig, steps: int, val_loss: float | None = None) -> list[float]:
    """The learning rate at each of `steps` optimizer steps (or plateau epochs, fed `val_loss`)."""
    opt = make_optimizer(models.build("keras"), cfg)
    schedule = make_schedule(opt, cfg, steps_per_epoch=steps // cfg.epochs)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        if val_loss is not None:
            schedule.step(val_loss)
        elif schedule is not None:
            schedule.step()
    return seen


def test_onecycle_warms_up_to_the_peak_then_anneals():
    lrs = lrs_over(TrainConfig(schedule="onecycle", lr=0.01, epochs=2), steps=100)
    peak = lrs.index(max(lrs))
    assert lrs[0] == pytest.approx(0.01 / 25) and max(lrs) == pytest.approx(0.01, rel=1e-3)
    assert 20 <= peak <= 40  # 30 % of the steps warm up
    assert lrs[-1] < 1e-5 and all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :], strict=False))


def test_plateau_halves_the_lr_after_four_epochs_without_improvement():
    lrs = lrs_over(TrainConfig(schedule="plateau", lr=0.01, epochs=6), steps=6, val_loss=1.0)
    assert lrs == [0.01] * 5 + [0.005]


def test_no_schedule_keeps_the_lr():
    assert lrs_over(TrainConfig(schedule="none", lr=0.01, epochs=2), steps=10) == [0.01] * 10
