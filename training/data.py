"""The digits as a training run sees them: float tensors, the seeded train/validation split, normalisation and
the augmentations. The dataset itself (sources, checksums, the uint8 cache) is serving/mnist.py's: torch-free,
so that the load tester can read it too."""

import math

import numpy as np
import torch
import torch.nn.functional as F

from serving.contract import IMAGE_SIDE
from serving.mnist import MEAN, MNIST, STD

# Elastic distortion as Simard et al. (2003) define it: a field of uniform(-1, 1) pixel displacements,
# smoothed by a Gaussian of ELASTIC_SIGMA pixels and scaled by ELASTIC_ALPHA; it moves strokes by about 1 px
# (rms) in smooth, local bends that an affine warp cannot make. Ciresan et al.'s MNIST values (sigma 6,
# alpha 36): with Simard's sharper sigma 4, alpha 34 on top of the affine warp, `best` fell to 99.12 %.
ELASTIC_ALPHA, ELASTIC_SIGMA = 36.0, 6.0


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,28,28] -> float [N,1,28,28] in [0,1]; normalised after augmentation: padding = background."""
    return torch.from_numpy(images).unsqueeze(1).float().div_(255)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def split(
    mnist: MNIST, val_size: int, seed: int, train_limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded train/validation split of the (possibly limited) training set: x_train, y_train, x_val, y_val.
    With train_limit, the validation part is at most a tenth of it."""
    images, labels = mnist.train_images, mnist.train_labels
    if train_limit is not None:
        images, labels = images[:train_limit], labels[:train_limit]
        val_size = min(val_size, len(images) // 10)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    x, y = to_tensor(images)[order], torch.from_numpy(labels)[order]
    return x[val_size:], y[val_size:], x[:val_size], y[:val_size]


def augment(x: torch.Tensor, generator: torch.Generator, hflip: bool = False, elastic: bool = False):
    """Random rotation +-10 deg, scale 0.9-1.1, translation +-2 px (and a mirror with hflip), then the elastic
    distortion if asked: one resampling of the batch [N,1,28,28] in [0,1]."""
    n = x.shape[0]
    rand = torch.rand(n, 5, generator=generator, device=x.device) * 2 - 1  # uniform in [-1, 1]
    angle, scale = rand[:, 0] * math.radians(10), 1 + rand[:, 1] * 0.1
    half = IMAGE_SIDE / 2  # grid units: half the image is 1.0
    tx, ty = rand[:, 2] * 2 / half, rand[:, 3] * 2 / half
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    flip = torch.where(rand[:, 4] > 0, -1.0, 1.0) if hflip else torch.ones_like(cos)
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if elastic:
        grid = grid + elastic_field(x, generator) / half
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def elastic_field(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image smooth random displacements in pixels, [N,H,W,2] (x, y) like a sampling grid."""
    n, _, h, w = x.shape
    field = torch.rand(n, 2, h, w, generator=generator, device=x.device) * 2 - 1
    radius = int(2 * ELASTIC_SIGMA)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(taps**2) / (2 * ELASTIC_SIGMA**2))
    kernel = (kernel / kernel.sum()).repeat(2, 1, 1, 1)  # one Gaussian per displacement axis
    field = F.conv2d(field, kernel.view(2, 1, -1, 1), padding=(radius, 0), groups=2)
    field = F.conv2d(field, kernel.view(2, 1, 1, -1), padding=(0, radius), groups=2)
    return (field * ELASTIC_ALPHA).permute(0, 2, 3, 1)
