"""The architectures, a registry by name, and the per-layer table (output shape, receptive field).

Every model takes normalised float images [N, 1, 28, 28] and returns logits [N, 10]. Each is a `Net` with a
`features` part (fine-tuning can freeze it) and a `classifier` part.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from serving.contract import IMAGE_PIXELS, IMAGE_SHAPE, NUM_CLASSES


class Net(nn.Module):
    def __init__(self, features: nn.Sequential, classifier: nn.Sequential):
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def conv_block(
    c_in: int, c_out: int, batchnorm: bool, padding: int = 1, kernel: int = 3, stride: int = 1
) -> list[nn.Module]:
    # No conv bias when BN follows: BN's shift makes it redundant.
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=not batchnorm)
    layers: list[nn.Module] = [conv]
    if batchnorm:
        layers.append(nn.BatchNorm2d(c_out))
    return [*layers, nn.ReLU()]


def mlp(batchnorm: bool = False, dropout: float = 0.5) -> Net:
    hidden = [nn.Flatten(), nn.Linear(IMAGE_PIXELS, 512), nn.ReLU(), nn.Dropout(dropout)]
    hidden += [nn.Linear(512, 256), nn.ReLU(), nn.Dropout(dropout)]
    return Net(nn.Sequential(*hidden), nn.Sequential(nn.Linear(256, NUM_CLASSES)))


def cnn(batchnorm: bool = False, dropout: float = 0.25) -> Net:
    """pytorch/examples mnist `Net`."""
    features = nn.Sequential(*conv_block(1, 32, batchnorm), *conv_block(32, 64, batchnorm), nn.MaxPool2d(2))
    classifier = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64 * 14 * 14, 128),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(128, NUM_CLASSES),
    )
    return Net(features, classifier)


def cnn2(batchnorm: bool = False, dropout: float = 0.0) -> Net:
    """The two-conv tutorial network, with its init: conv N(0, 0.01), fc Xavier-uniform, zero biases."""
    features = nn.Sequential(
        *conv_block(1, 32, batchnorm), nn.MaxPool2d(2), *conv_block(32, 64, batchnorm), nn.MaxPool2d(2)
    )
    classifier = nn.Sequential(
        nn.Flatten(), nn.Linear(7 * 7 * 64, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, NUM_CLASSES)
    )
    net = Net(features, classifier)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.01)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
        if isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    return net


def small(batchnorm: bool = True, dropout: float = 0.0) -> Net:
    """cnn2's shape at half its width (16 and 32 channels) with batch-norm: under half of cnn2's FP32 training
    time per image, and with BN it reaches cnn2's accuracy in two epochs. The default architecture."""
    features = nn.Sequential(
        *conv_block(1, 16, batchnorm), nn.MaxPool2d(2), *conv_block(16, 32, batchnorm), nn.MaxPool2d(2)
    )
    classifier = nn.Sequential(
        nn.Flatten(), nn.Linear(7 * 7 * 32, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, NUM_CLASSES)
    )
    return Net(features, classifier)


def keras(batchnorm: bool = False, dropout: float = 0.0) -> Net:
    """The Keras tutorial convnet: valid convolutions, so 28 -> 26 -> 13 -> 11 -> 5."""
    features = nn.Sequential(
        *conv_block(1, 32, batchnorm, padding=0),
        nn.MaxPool2d(2),
        *conv_block(32, 64, batchnorm, padding=0),
        nn.MaxPool2d(2),
    )
    classifier = nn.Sequential(
        nn.Flatten(), nn.Linear(5 * 5 * 64, 64), nn.ReLU(), nn.Dropout(dropout), nn.Linear(64, NUM_CLASSES)
    )
    return Net(features, classifier)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(batchnorm: bool = True, dropout: float = 0.0) -> Net:
    """A small ResNet for 1x28x28: 3x3 stem (no 7x7/maxpool, the image is tiny), stages 28 -> 14 -> 7."""
    features = nn.Sequential(
        *conv_block(1, 16, batchnorm=True),
        BasicBlock(16, 16),
        BasicBlock(16, 32, stride=2),
        BasicBlock(32, 64, stride=2),
    )
    classifier = nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(64, NUM_CLASSES)
    )
    return Net(features, classifier)


def best(batchnorm: bool = True, dropout: float = 0.3) -> Net:
    """The strongest single model: a wider VGG-style CNN with BN; trained with augmentation and OneCycle."""
    features = nn.Sequential(
        *conv_block(1, 32, True),
        *conv_block(32, 32, True),
        nn.MaxPool2d(2),
        *conv_block(32, 64, True),
        *conv_block(64, 64, True),
        nn.MaxPool2d(2),
    )
    classifier = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 256, bias=False),
        nn.BatchNorm1d(256),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(256, NUM_CLASSES),
    )
    return Net(features, classifier)


def strided(batchnorm: bool = True, dropout: float = 0.4) -> Net:
    """A VGG-style CNN that downsamples with strided 5x5 convolutions instead of pooling, valid 3x3
    convolutions (28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4 -> 1), BN and dropout after each stage: a design unlike
    `best`'s, so that it errs on other digits (an ensemble member)."""
    features = nn.Sequential(
        *conv_block(1, 32, batchnorm, padding=0),
        *conv_block(32, 32, batchnorm, padding=0),
        *conv_block(32, 32, batchnorm, padding=2, kernel=5, stride=2),
        nn.Dropout(dropout),
        *conv_block(32, 64, batchnorm, padding=0),
        *conv_block(64, 64, batchnorm, padding=0),
        *conv_block(64, 64, batchnorm, padding=2, kernel=5, stride=2),
        nn.Dropout(dropout),
        *conv_block(64, 128, batchnorm, padding=0, kernel=4),
    )
    classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(128, NUM_CLASSES))
    return Net(features, classifier)


ARCHS: dict[str, Callable[..., Net]] = {
    "mlp": mlp,
    "cnn": cnn,
    "cnn2": cnn2,
    "small": small,
    "keras": keras,
    "resnet": resnet,
    "best": best,
    "strided": strided,
}


def build(arch: str, batchnorm: bool | None = None, dropout: float | None = None) -> Net:
    """Build by name; batchnorm/dropout None keep the architecture's own default."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    options = {k: v for k, v in (("batchnorm", batchnorm), ("dropout", dropout)) if v is not None}
    return ARCHS[arch](**options)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- receptive field ------------------------------------------------------------------------------------


def _pair(v: int | tuple[int, int]) -> int:
    return v if isinstance(v, int) else v[0]  # all kernels here are square


def receptive_field(layers: Iterable[nn.Module], rf: int = 1, jump: int = 1) -> tuple[int, int]:
    """(receptive field, jump) after `layers`: each k x k window with stride s adds (k-1)*jump, jump *= s.

    A residual block's field is that of its longest path (the two convs); the shortcut sees less.
    """
    for layer in layers:
        if isinstance(layer, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            rf += (_pair(layer.kernel_size) - 1) * jump
            jump *= _pair(layer.stride)
        elif isinstance(layer, BasicBlock):
            rf, jump = receptive_field((layer.conv1, layer.conv2), rf, jump)
    return rf, jump


@dataclass
class LayerRow:
    name: str
    kind: str
    shape: tuple[int, ...]
    receptive_field: str
    params: int


def layer_table(model: Net) -> list[LayerRow]:
    """One row per layer (a residual block counts as one): output shape, receptive field."""
    units = [(f"features.{n}", m) for n, m in model.features.named_children()]
    units += [(f"classifier.{n}", m) for n, m in model.classifier.named_children()]
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:])))
        for name, m in units
    ]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *IMAGE_SHAPE, device=next(model.parameters()).device))
    model.train(was_training)
    for h in hooks:
        h.remove()
    rows, rf, jump, spatial = [], 1, 1, True
    for name, m in units:
        rf, jump = receptive_field([m], rf, jump)
        shape = shapes[name]
        # Once the spatial dims are gone (flatten, global pool), every output sees the whole image.
        spatial = spatial and len(shape) == 3 and shape[1] > 1
        field = f"{rf}x{rf}" if spatial else "28x28 (all)"
        rows.append(LayerRow(name, type(m).__name__, shape, field, sum(p.numel() for p in m.parameters())))
    return rows


def format_table(model: Net) -> str:
    rows = layer_table(model)
    lines = [f"{'layer':<16}{'type':<18}{'output':<16}{'receptive field':<18}{'params':>10}"]
    for r in rows:
        shape = "x".join(map(str, r.shape))
        lines.append(f"{r.name:<16}{r.kind:<18}{shape:<16}{r.receptive_field:<18}{r.params:>10,}")
    lines.append(f"total parameters: {param_count(model):,}")
    return "\n".join(lines)
