"""mnist-train end to end: bad input gives one clear line and writes nothing; 1 real epoch serves >= 98%."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training.cli import main
from training.data import load_mnist
from training.train import TrainConfig, train


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


def error_of(capsys, *args):
    """Run main() in-process (no interpreter start-up per case); return the one-line error it exits with."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    message = exit_info.value.code if isinstance(exit_info.value.code, str) else capsys.readouterr().err
    assert "Traceback" not in message
    last = message.strip().splitlines()[-1]
    assert last.startswith("mnist-train: error:"), message
    return last


def test_unknown_arch_in_a_real_process(tmp_path):
    result = mnist_train("--arch", "vgg", "--repo", str(tmp_path / "models"))
    assert_clean_error(result, "invalid choice: 'vgg'")
    assert not (tmp_path / "models").exists()


def test_repo_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert "is a file" in error_of(
        capsys, "--repo", str(tmp_path / "file" / "models"), "--train-limit", "100"
    )


def test_bad_model_name(tmp_path, capsys):
    assert "not allowed" in error_of(capsys, "--repo", str(tmp_path / "models"), "--name", "../escape")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_data_dir(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 60000), ("t10k", 10000)):
        (data / f"{split}-images-idx3-ubyte").write_bytes(b"\x00\x00\x00\x00garbage")
        (data / f"{split}-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + n.to_bytes(4, "big"))
    assert "not an IDX file" in error_of(capsys, "--data-dir", str(data), "--repo", str(tmp_path / "models"))
    assert not (tmp_path / "models").exists()


def test_missing_data_dir(tmp_path, capsys):
    line = error_of(capsys, "--data-dir", str(tmp_path / "nope"), "--repo", str(tmp_path / "models"))
    assert "does not exist" in line and "--data-dir" in line


def test_freeze_needs_init_from(tmp_path, capsys):
    assert "--init-from" in error_of(capsys, "--freeze", "features", "--repo", str(tmp_path / "models"))


def test_resume_from_missing_checkpoint(tmp_path, capsys):
    assert "does not exist" in error_of(
        capsys, "--resume", str(tmp_path / "none.pt"), "--repo", str(tmp_path)
    )


def test_help_explains_no_hflip(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "mirrored digit is another symbol" in " ".join(capsys.readouterr().out.split())


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_overfit_batch(mnist, capsys):
    main(["--arch", "cnn2", "--overfit-batch", "64"])
    assert "train accuracy 1.0000" in capsys.readouterr().out


def test_resume_and_fine_tune(tmp_path, mnist, capsys):
    cfg = TrainConfig(arch="keras", epochs=1, train_limit=1000, val_size=100)
    first = train(cfg, mnist, checkpoint_path=tmp_path / "last.pt", log=lambda *_: None)
    resumed = train(
        replace(cfg, epochs=2), mnist, resume=torch.load(tmp_path / "last.pt"), log=lambda *_: None
    )
    assert resumed.epochs_run == 2 and resumed.history.train_loss[0] == first.history.train_loss[0]
    assert len(resumed.history.train_loss) == 2

    tuned = train(
        replace(cfg, init_from=str(tmp_path / "last.pt"), freeze="features"), mnist, log=lambda *_: None
    )
    for name, weight in first.model.features.state_dict().items():
        assert torch.equal(weight, tuned.model.features.state_dict()[name]), name  # frozen
    assert not torch.equal(first.model.classifier[-1].weight, tuned.model.classifier[-1].weight)  # trained

    wrong_arch = mnist_train(
        "--arch", "cnn2", "--resume", str(tmp_path / "last.pt"), "--repo", str(tmp_path / "m")
    )
    assert_clean_error(wrong_arch, "arch 'keras'")


@pytest.mark.slow
def test_one_epoch_on_real_mnist_serves_98_percent(tmp_path, mnist):
    result = mnist_train(
        "--arch", "cnn2", "--epochs", "1", "--repo", str(tmp_path / "models"), "--name", "mnist"
    )
    assert result.returncode == 0, result.stderr
    version = tmp_path / "models" / "mnist" / "1"
    assert result.stdout.strip().splitlines()[-1] == f"exported: {version}"
    for name in (
        "model.onnx",
        "metrics.json",
        "curves.png",
        "confusion.png",
        "misclassified.png",
        "filters.png",
    ):
        assert (version / name).stat().st_size > 0
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    (probs,) = session.run(None, {"images": mnist.test_images[:, None]})
    accuracy = float((probs.argmax(1) == mnist.test_labels).mean())
    assert accuracy >= 0.98
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert np.array(metrics["confusion_matrix"]).sum() == 10_000
