"""The digits as training sees them: the seeded split, the affine and the elastic augmentations."""

import torch

from serving.mnist import MNIST
from training.data import ELASTIC_ALPHA, augment, elastic_field, split


def bars(n: int = 256) -> torch.Tensor:
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 8:20, 6:10] = 1.0  # a bar in the left half
    return x


def test_augment_keeps_digits_upright_and_in_frame():
    x = bars()
    out = augment(x, hflip=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    left, right = out[..., :14].sum((1, 2, 3)), out[..., 14:].sum((1, 2, 3))
    assert (left > right).all()  # +-10 deg, +-2 px, scale 0.9-1.1 never moves it across the middle
    ratio = out.sum((1, 2, 3)) / x.sum((1, 2, 3))
    assert ratio.min() > 0.7 and ratio.max() < 1.3  # scale 0.9-1.1: area changes by at most ~20%


def test_hflip_mirrors_some():
    out = augment(bars(), hflip=True, generator=torch.Generator().manual_seed(0))
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
    a = split(mnist, val_size=100, seed=1)
    b = split(mnist, val_size=100, seed=1)
    c = split(mnist, val_size=100, seed=2)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert set(indices(a[2])) != set(indices(c[2]))
    train_part, val_part = set(indices(a[0])), set(indices(a[2]))
    assert (len(train_part), len(val_part)) == (900, 100)
    assert not train_part & val_part and train_part | val_part == set(range(1000))
    assert a[1].tolist() == [i % 10 for i in indices(a[0])]  # each label stays with its image


def test_train_limit_caps_validation_at_a_tenth():
    x_train, _, x_val, _ = split(fake_mnist(), val_size=5000, seed=0, train_limit=500)
    assert (len(x_train), len(x_val)) == (450, 50)
    assert set(indices(x_train)) | set(indices(x_val)) == set(range(500))


def test_elastic_field_is_smooth_and_about_a_pixel():
    field = elastic_field(torch.zeros(64, 1, 28, 28), torch.Generator().manual_seed(0))
    assert field.shape == (64, 28, 28, 2)
    inner = field[:, 8:20, 8:20]  # away from the zero-padded border of the smoothing
    rms = inner.pow(2).mean().sqrt().item()
    assert 0.7 < rms < 1.5 and rms < ELASTIC_ALPHA / 10
    step = (inner[:, 1:] - inner[:, :-1]).pow(2).mean().sqrt().item()
    assert step < rms / 3  # neighbours move together: a smooth bend, not pixel noise


def test_elastic_distortion_bends_digits_but_keeps_them_in_place():
    x = bars()
    out = augment(x, torch.Generator().manual_seed(0), elastic=True)
    again = augment(x, torch.Generator().manual_seed(0), elastic=True)
    assert torch.equal(out, again)  # seeded
    assert not torch.equal(out, augment(x, torch.Generator().manual_seed(0)))  # more than the affine warp
    left, right = out[..., :14].sum((1, 2, 3)), out[..., 14:].sum((1, 2, 3))
    assert (left > right).all()
    ratio = out.sum((1, 2, 3)) / x.sum((1, 2, 3))
    assert 0.9 < ratio.mean() < 1.1  # strokes are stretched in some places, squeezed in others

    def centre(images: torch.Tensor) -> torch.Tensor:
        ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
        mass = images.sum((1, 2, 3))
        return torch.stack(
            [(images[:, 0] * ys).sum((1, 2)) / mass, (images[:, 0] * xs).sum((1, 2)) / mass], 1
        )

    shift = (centre(out) - centre(x)).norm(dim=1)
    assert shift.mean() < 3 and shift.max() < 8  # +-2 px translation plus a local bend of ~1 px rms
