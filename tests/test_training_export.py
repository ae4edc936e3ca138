"""ONNX contract and parity on a briefly trained model; repository versioning and atomicity."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from serving.proto.inference.model_config_pb2 import TYPE_FP32, TYPE_UINT8
from serving.repository import read_config
from training.config import TrainConfig
from training.export import (
    PARITY_TOL,
    ExportError,
    Servable,
    check_parity,
    config_pbtxt,
    reference_probabilities,
    to_onnx,
    write_version,
)
from training.train import train


@pytest.fixture(scope="module")
def trained(mnist):
    """A keras net trained briefly in bfloat16 autocast (amp on the CPU), its reference and its export."""
    cfg = TrainConfig(arch="keras", epochs=1, train_limit=2000, dropout=0.2, amp=True)
    result = train(cfg, mnist, log=lambda *_: None)
    return (
        result,
        reference_probabilities(result.model, mnist.test_images),
        to_onnx(result.model, {"arch": "keras"}),
    )


def test_onnx_contract(trained):
    *_, model_bytes = trained
    model = onnx.load_model_from_string(model_bytes)
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["N", 1, 28, 28]
    assert out.name == "probabilities" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["N", 10]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["labels"] == "0,1,2,3,4,5,6,7,8,9" and meta["variant"] == "fp32" and meta["arch"] == "keras"


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_dynamic_batch_softmax_inside(trained, mnist, batch):
    *_, model_bytes = trained
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    (probs,) = session.run(None, {"images": mnist.test_images[:batch, None]})
    assert probs.shape == (batch, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_parity_on_full_test_set(trained, mnist):
    _, reference, model_bytes = trained
    assert check_parity(model_bytes, mnist.test_images, reference) <= PARITY_TOL
    assert (reference.argmax(1) == mnist.test_labels).mean() > 0.5  # 1800 images, but well above chance


def test_parity_failure_is_reported(trained, mnist):
    _, reference, model_bytes = trained
    off = reference.copy()
    off[:, 0] += 1e-4
    with pytest.raises(ExportError, match="disagrees"):
        check_parity(model_bytes, mnist.test_images, off)


def test_parity_reference_is_fp32_on_cpu_whatever_the_training_device_computes(trained, mnist):
    """A net trained where convolutions run below FP32 (TF32 on CUDA; here bfloat16 autocast, as trained) is
    judged by an FP32 CPU reference: the device's own outputs would miss the parity tolerance."""
    result, _, model_bytes = trained
    digits = mnist.test_images[:500]  # bfloat16 autocast is slow on a CPU without bf16 instructions
    reference = reference_probabilities(result.model, digits)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        as_on_device = Servable(result.model)(torch.from_numpy(digits[:, None])).float().numpy()
        within_autocast = reference_probabilities(result.model, digits)
    assert np.abs(as_on_device - reference).max() > 10 * PARITY_TOL
    with pytest.raises(ExportError, match="disagrees"):
        check_parity(model_bytes, digits, as_on_device)
    np.testing.assert_array_equal(within_autocast, reference)  # the ambient autocast does not reach it

    # Nor do the net's own device and dtype: it is copied to the CPU in FP32, the caller's net untouched.
    half = copy.deepcopy(result.model).to(torch.bfloat16)
    from_half = reference_probabilities(half, digits)
    assert from_half.dtype == np.float32 and next(half.parameters()).dtype == torch.bfloat16
    fp32_of_half = copy.deepcopy(half).float()
    np.testing.assert_array_equal(from_half, reference_probabilities(fp32_of_half, digits))
    check_parity(to_onnx(half, {}), digits, from_half)


def snapshot(root):
    return sorted(
        (str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*")
    )


def test_versions_increment(tmp_path):
    repo = tmp_path / "models"
    v1 = write_version(repo, "mnist", b"one", lambda d: (d / "metrics.json").write_text("{}"))
    v2 = write_version(repo, "mnist", b"two", lambda d: None)
    assert (v1.name, v2.name) == ("1", "2")
    assert (v2 / "model.onnx").read_bytes() == b"two" and (v1 / "metrics.json").exists()
    assert (repo / "mnist" / "config.pbtxt").read_text() == config_pbtxt("mnist")
    assert sorted(p.name for p in (repo / "mnist").iterdir()) == ["1", "2", "config.pbtxt"]  # no temp left


def test_config_pbtxt_declares_the_contract(tmp_path):
    path = tmp_path / "config.pbtxt"
    path.write_text(config_pbtxt("digits"))
    config = read_config(path)  # the server's own parser and contract check
    assert (config.name, config.platform, config.max_batch_size) == ("digits", "onnxruntime_onnx", 64)
    assert [g.count for g in config.instance_group] == [2]
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("images", TYPE_UINT8, [1, 28, 28])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("probabilities", TYPE_FP32, [10])
    ]
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 0


def fail(_dir):
    raise RuntimeError("disk full")


def test_failed_export_leaves_existing_repo_unchanged(tmp_path):
    repo = tmp_path / "models"
    write_version(repo, "mnist", b"one", lambda d: None)
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError):
        write_version(repo, "mnist", b"two", fail)
    assert snapshot(tmp_path) == before


def test_failed_export_creates_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        write_version(tmp_path / "a" / "models", "mnist", b"one", fail)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../x", "bad name"])
def test_bad_model_name(tmp_path, name):
    with pytest.raises(ExportError, match="not allowed"):
        write_version(tmp_path, name, b"x", lambda d: None)
    assert list(tmp_path.iterdir()) == []
