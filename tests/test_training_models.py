"""Every architecture: forward shape, parameter count, per-layer table; the receptive-field arithmetic."""

import pytest
import torch
from torch import nn

from training import models

# Counted by hand from the definitions (weights + biases; BN adds 2 per channel).
PARAMS = {
    "mlp": 784 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10,
    "cnn": 320 + 18_496 + 64 * 14 * 14 * 128 + 128 + 1290,
    "cnn2": 320 + 18_496 + 7 * 7 * 64 * 128 + 128 + 1290,
    "keras": 320 + 18_496 + 5 * 5 * 64 * 64 + 64 + 650,
    # convolutions without bias before BN (2 parameters per channel)
    "small": 16 * 9 + 32 + 16 * 32 * 9 + 64 + 7 * 7 * 32 * 128 + 128 + 1290,
    "strided": 32 * 9
    + 32 * 32 * 9
    + 32 * 32 * 25
    + 3 * 64
    + 32 * 64 * 9
    + 64 * 64 * 9
    + 64 * 64 * 25
    + 3 * 128
    + 64 * 128 * 16
    + 256
    + 1290,
}


@pytest.mark.parametrize("arch", list(models.ARCHS))
def test_forward_shape(arch):
    model = models.build(arch).eval()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("arch", list(PARAMS))
def test_param_count(arch):
    assert models.param_count(models.build(arch)) == PARAMS[arch]


def test_cnn2_options():
    plain, bn = models.build("cnn2"), models.build("cnn2", batchnorm=True, dropout=0.3)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 2
    assert [m.p for m in bn.modules() if isinstance(m, nn.Dropout)] == [0.3]
    # BN replaces the conv bias: 2 conv biases (32 + 64) out, 2 * (32 + 64) BN parameters in
    assert models.param_count(bn) == PARAMS["cnn2"] - 96 + 192


def test_cnn2_init():
    torch.manual_seed(0)
    model = models.build("cnn2")
    conv = model.features[0]
    assert conv.bias.abs().sum() == 0 and abs(conv.weight.std().item() - 0.01) < 0.003
    fc = model.classifier[1]
    bound = (6 / (fc.in_features + fc.out_features)) ** 0.5  # Xavier-uniform
    assert fc.weight.abs().max() <= bound and fc.weight.abs().max() > 0.9 * bound


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch 'vgg'"):
        models.build("vgg")


def test_receptive_field_three_stacked_3x3_is_7():
    convs = [nn.Conv2d(1, 1, 3, padding=1) for _ in range(3)]
    assert models.receptive_field(convs) == (7, 1)


def test_receptive_field_with_pooling():
    # 3x3 conv (3), 2x2 pool stride 2 (4, jump 2), 3x3 conv (4 + 2*2 = 8)
    layers = [nn.Conv2d(1, 1, 3), nn.MaxPool2d(2), nn.Conv2d(1, 1, 3)]
    assert models.receptive_field(layers) == (8, 2)


def test_layer_table_cnn2():
    rows = {r.name: r for r in models.layer_table(models.build("cnn2"))}
    assert rows["features.5"].shape == (64, 7, 7) and rows["features.5"].receptive_field == "10x10"
    assert rows["classifier.4"].shape == (10,) and rows["classifier.4"].receptive_field == "28x28 (all)"
    assert sum(r.params for r in rows.values()) == PARAMS["cnn2"]


def test_residual_block_counts_its_longest_path():
    rows = models.layer_table(models.build("resnet"))
    first_block = next(r for r in rows if r.kind == "BasicBlock")
    assert first_block.receptive_field == "7x7"  # stem 3x3, then the block's two 3x3 convs
