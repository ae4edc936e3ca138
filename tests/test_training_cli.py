"""mnist-train end to end: bad input gives one clear line and writes nothing; a real 1-epoch run serves >= 98%."""

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from training.data import load_mnist


def mnist_train(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "training.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def assert_clean_error(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mnist-train: error:"), result.stderr
    for word in words:
        assert word in last


def test_unknown_arch(tmp_path):
    result = mnist_train("--arch", "vgg", "--repo", str(tmp_path / "models"))
    assert_clean_error(result, "invalid choice: 'vgg'")
    assert not (tmp_path / "models").exists()


def test_repo_under_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    result = mnist_train("--repo", str(tmp_path / "file" / "models"), "--train-limit", "100")
    assert_clean_error(result, "is a file", "--repo")


def test_bad_model_name(tmp_path):
    result = mnist_train("--repo", str(tmp_path / "models"), "--name", "../escape")
    assert_clean_error(result, "not allowed")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_data_dir(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (data / name).write_bytes(b"\x00\x00\x00\x00garbage")
    result = mnist_train("--data-dir", str(data), "--repo", str(tmp_path / "models"))
    assert_clean_error(result, "not an IDX file")
    assert not (tmp_path / "models").exists()


def test_missing_data_dir(tmp_path):
    result = mnist_train("--data-dir", str(tmp_path / "nope"), "--repo", str(tmp_path / "models"))
    assert_clean_error(result, "does not exist", "--data-dir")


def test_freeze_needs_init_from(tmp_path):
    result = mnist_train("--freeze", "features", "--repo", str(tmp_path / "models"))
    assert_clean_error(result, "--init-from")


def test_resume_from_missing_checkpoint(tmp_path):
    result = mnist_train("--resume", str(tmp_path / "none.pt"), "--repo", str(tmp_path / "models"))
    assert_clean_error(result, "does not exist")


def test_help_explains_no_hflip():
    result = mnist_train("--help")
    assert result.returncode == 0 and "mirrored digit is another symbol" in " ".join(result.stdout.split())


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_overfit_batch(mnist):
    result = mnist_train("--arch", "cnn2", "--overfit-batch", "64")
    assert result.returncode == 0, result.stderr
    assert "train accuracy 1.0000" in result.stdout


def test_fine_tune_and_resume(tmp_path, mnist):
    repo = tmp_path / "models"
    base = ["--arch", "keras", "--train-limit", "1000", "--val-size", "100", "--repo", str(repo)]
    first = mnist_train(*base, "--epochs", "1")
    assert first.returncode == 0, first.stderr
    v1 = first.stdout.strip().splitlines()[-1].removeprefix("exported: ")
    tuned = mnist_train(*base, "--epochs", "1", "--init-from", f"{v1}/checkpoint.pt", "--freeze", "features")
    assert tuned.returncode == 0, tuned.stderr
    resumed = mnist_train(*base, "--epochs", "2", "--resume", f"{v1}/checkpoint.pt")
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((repo / "mnist" / "3" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and len(metrics["history"]["train_loss"]) == 2
    wrong_arch = mnist_train("--arch", "cnn2", "--resume", f"{v1}/checkpoint.pt", "--repo", str(repo))
    assert_clean_error(wrong_arch, "arch 'keras'")


@pytest.mark.slow
def test_one_epoch_on_real_mnist_serves_98_percent(tmp_path, mnist):
    result = mnist_train("--arch", "cnn2", "--epochs", "1", "--repo", str(tmp_path / "models"), "--name", "mnist")
    assert result.returncode == 0, result.stderr
    version = tmp_path / "models" / "mnist" / "1"
    assert result.stdout.strip().splitlines()[-1] == f"exported: {version}"
    for name in ("model.onnx", "metrics.json", "curves.png", "confusion.png", "misclassified.png", "filters.png"):
        assert (version / name).stat().st_size > 0
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    (probs,) = session.run(None, {"images": mnist.test_images[:, None]})
    accuracy = float((probs.argmax(1) == mnist.test_labels).mean())
    assert accuracy >= 0.98
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert np.array(metrics["confusion_matrix"]).sum() == 10_000
