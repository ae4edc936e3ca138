"""training.variants on a briefly trained real model and real MNIST: accuracy, metadata, serving, failure."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from serving.client import MnistClient
from serving.mnist import MNIST
from serving.runtime import CPU, CUDA, ModelSession, RuntimeOptions, resolve_device
from training import models
from training.data import normalise, to_tensor
from training.export import to_onnx, write_version
from training.variants import (
    CALIBRATION_SIZE,
    MAX_ACCURACY_DROP,
    PARITY,
    VARIANTS,
    VariantError,
    build_variant,
    calibration_images,
)


def train_fp32(mnist: MNIST, path: Path) -> None:
    """A small CNN (conv 8, conv 16, fc 32) trained for one pass over 8k real digits, exported for real."""
    torch.manual_seed(0)
    features = nn.Sequential(
        *models.conv_block(1, 8, batchnorm=False), nn.MaxPool2d(2), *models.conv_block(8, 16, batchnorm=False)
    )
    classifier = nn.Sequential(
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    net = models.Net(features, classifier)
    x, y = normalise(to_tensor(mnist.train_images[:8_000])), torch.from_numpy(mnist.train_labels[:8_000])
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for i in range(0, len(x), 32):
        loss = F.cross_entropy(net(x[i : i + 32]), y[i : i + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path.write_bytes(to_onnx(net.eval(), {"arch": "tiny-cnn", "config_digest": "abc"}))


def build_variant_repo(mnist: MNIST, repo: Path) -> None:
    """The FP32 model as `mnist` and each variant as `mnist-<kind>`, all version 1."""
    fp32_path = repo.parent / "model.onnx"
    train_fp32(mnist, fp32_path)
    write_version(repo, "mnist", fp32_path.read_bytes(), lambda version_dir: None)
    for kind in VARIANTS:
        variant, _ = build_variant(kind, fp32_path, mnist)
        write_version(repo, f"mnist-{kind}", variant.SerializeToString(), lambda version_dir: None)


@pytest.fixture(scope="module")
def variant_repo(mnist: MNIST, built_once) -> Path:
    """The variants' repository, built once for the whole run (read-only)."""
    return built_once("variants", lambda root: build_variant_repo(mnist, root / "repo")) / "repo"


@pytest.fixture(scope="module")
def fp32_path(variant_repo: Path) -> Path:
    return variant_repo / "mnist" / "1" / "model.onnx"


def accuracy_of(session: ModelSession, mnist: MNIST) -> float:
    probs = np.concatenate(
        [session.run(mnist.test_images[i : i + 2000, None]) for i in range(0, 10_000, 2000)]
    )
    return float((probs.argmax(1) == mnist.test_labels).mean())


def test_calibration_sample_is_seeded_training_images(mnist: MNIST) -> None:
    sample = calibration_images(mnist.train_images)
    assert sample.shape == (CALIBRATION_SIZE, 1, 28, 28) and sample.dtype == np.uint8
    np.testing.assert_array_equal(sample, calibration_images(mnist.train_images))
    train_rows = {row.tobytes() for row in mnist.train_images}
    assert all(image[0].tobytes() in train_rows for image in sample[:50])


def test_int8_keeps_accuracy_and_metadata(mnist: MNIST, fp32_path: Path, variant_repo: Path) -> None:
    version_dir = variant_repo / "mnist-int8" / "1"
    assert (version_dir.parent / "config.pbtxt").is_file()

    model = onnx.load(version_dir / "model.onnx")
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Softmax"} <= ops
    per_channel = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.attribute]
    assert per_channel, "weights should be quantized per channel (DequantizeLinear with an axis)"

    fp32 = ModelSession(fp32_path, RuntimeOptions(device="cpu"))
    int8 = ModelSession(version_dir / "model.onnx", RuntimeOptions(device="cpu"))
    assert int8.variant == "int8"
    meta = int8.metadata_props
    assert (
        meta["arch"] == "tiny-cnn"
        and meta["config_digest"] == "abc"
        and meta["labels"] == fp32.metadata_props["labels"]
    )
    assert "training images" in meta["calibration"]
    fp32_accuracy, int8_accuracy = accuracy_of(fp32, mnist), accuracy_of(int8, mnist)
    assert fp32_accuracy > 0.9, "the fixture model should have learned something"
    assert int8_accuracy >= fp32_accuracy - MAX_ACCURACY_DROP
    assert float(meta["test_accuracy"]) == pytest.approx(int8_accuracy, abs=1e-4)


@pytest.mark.parametrize("kind", ["fp16", "fp32-ort-optimized"])
def test_float_variants_keep_metadata_and_parity(
    kind: str, mnist: MNIST, fp32_path: Path, variant_repo: Path
) -> None:
    path = variant_repo / f"mnist-{kind}" / "1" / "model.onnx"
    if kind == "fp16":
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in onnx.load(path).graph.initializer)
    session = ModelSession(path, RuntimeOptions(device="cpu"))  # the serving contract check, for real
    assert session.variant == kind and session.metadata_props["arch"] == "tiny-cnn"
    want = ModelSession(fp32_path, RuntimeOptions(device="cpu")).run(mnist.test_images[:, None])
    got = session.run(mnist.test_images[:, None])
    assert got.dtype == np.float32
    assert np.abs(got - want).max() <= PARITY[kind].max_prob_diff
    assert (got.argmax(1) == want.argmax(1)).mean() >= PARITY[kind].min_argmax_agreement


def test_server_serves_each_variant(mnist: MNIST, variant_repo: Path, start_server) -> None:
    digits = list(mnist.test_images[:32])
    server = start_server(variant_repo)
    for name in ["mnist", *(f"mnist-{kind}" for kind in VARIANTS)]:
        want = ModelSession(variant_repo / name / "1" / "model.onnx", RuntimeOptions(device="cpu"))
        expected = want.run(mnist.test_images[:32, None])
        with MnistClient(server.target, model=name) as client:
            result = client.classify(digits)
        assert result.model == name
        got = np.array([p.probabilities for p in result.predictions], dtype=np.float32)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert [p.label for p in result.predictions] == list(expected.argmax(1))


def test_bad_calibration_fails_loudly(mnist: MNIST, fp32_path: Path) -> None:
    # Calibrating on blank images sets activation ranges no real digit fits in: accuracy collapses.
    blank = MNIST(np.zeros_like(mnist.train_images), mnist.train_labels, mnist.test_images, mnist.test_labels)
    with pytest.raises(VariantError, match="int8 variant"):
        build_variant("int8", fp32_path, blank)


def test_unknown_variant_is_refused(mnist: MNIST, fp32_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        build_variant("int4", fp32_path, mnist)


@pytest.mark.cuda
@pytest.mark.skipif(
    resolve_device("auto") != CUDA, reason="needs onnxruntime-gpu and a CUDA GPU (CPU-only here)"
)
def test_fp16_on_cuda_matches_fp32(mnist: MNIST, fp32_path: Path, tmp_path: Path) -> None:
    variant, report = build_variant("fp16", fp32_path, mnist)  # judged on CUDA when a GPU is present
    assert report.accuracy >= report.fp32_accuracy - MAX_ACCURACY_DROP
    path = tmp_path / "fp16-cuda.onnx"
    onnx.save(variant, path)
    session = ModelSession(path, RuntimeOptions(device="cuda", batch_buckets=(1, 64)))
    want = ModelSession(fp32_path, RuntimeOptions(device="cpu")).run(mnist.test_images[:100, None])
    got = session.run(mnist.test_images[:100, None])
    assert session.provider == CUDA != CPU
    np.testing.assert_allclose(got, want, atol=PARITY["fp16"].max_prob_diff)
