"""ONNX contract and parity on a briefly trained model; repository versioning and atomicity."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from training.data import load_mnist
from training.export import ExportError, check_parity, config_pbtxt, to_onnx, write_version
from training.train import TrainConfig, train


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


@pytest.fixture(scope="module")
def trained(mnist):
    cfg = TrainConfig(arch="keras", epochs=1, train_limit=2000, dropout=0.2)
    result = train(cfg, mnist, log=lambda *_: None)
    return result, to_onnx(result.model, {"arch": "keras", "test_accuracy": f"{result.test_accuracy:.4f}"})


def test_onnx_contract(trained):
    _, model_bytes = trained
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
    _, model_bytes = trained
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    (probs,) = session.run(None, {"images": mnist.test_images[:batch, None]})
    assert probs.shape == (batch, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_parity_on_full_test_set(trained, mnist):
    result, model_bytes = trained
    assert check_parity(model_bytes, mnist.test_images, result.test_probs) <= 1e-5
    assert result.test_accuracy > 0.5  # briefly trained (1800 images), but well above chance


def test_parity_failure_is_reported(trained, mnist):
    result, model_bytes = trained
    off = result.test_probs.copy()
    off[:, 0] += 1e-4
    with pytest.raises(ExportError, match="disagrees"):
        check_parity(model_bytes, mnist.test_images, off)


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


def test_config_pbtxt_declares_the_contract():
    text = config_pbtxt("digits")
    for line in (
        'name: "digits"',
        'platform: "onnxruntime_onnx"',
        "max_batch_size: 64",
        "instance_group [ { count: 2 } ]",
        'name: "images"',
        "TYPE_UINT8",
        "dims: [ 1, 28, 28 ]",
        "TYPE_FP32",
        "dims: [ 10 ]",
        "max_queue_delay_microseconds: 0",
    ):
        assert line in text


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
