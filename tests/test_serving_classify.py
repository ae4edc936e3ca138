"""The mnist.v1 Classifier API, the image convention, the client class and mnist-predict."""

import io
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from serving.client import MnistClient
from serving.client import main as client_main
from serving.images import ImageError, decode_image, to_mnist
from serving.proto.mnist.v1 import classify_pb2 as pb
from serving.runtime import ModelSession, RuntimeOptions


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def confident(mnist, trained_repo: Path) -> tuple[np.ndarray, np.ndarray]:
    """Twelve test digits the model gets right with confidence >= 0.9 (so JPEG noise cannot flip them)."""
    session = ModelSession(trained_repo / "mnist" / "1" / "model.onnx", RuntimeOptions(device="cpu"))
    images, labels = mnist.test_images[:300], mnist.test_labels[:300]
    probabilities = session.run(images[:, None].copy())
    good = (probabilities.argmax(1) == labels) & (probabilities.max(1) >= 0.9)
    return images[good][:12], labels[good][:12]


def test_classify_raw_and_encoded_images(classifier, confident) -> None:
    images, labels = confident
    request = pb.ClassifyRequest(model="mnist", top_k=3, id="x1")
    request.images.extend(pb.Image(pixels=image.tobytes()) for image in images[:6])
    request.images.extend(pb.Image(encoded=png(image)) for image in images[6:])
    response = classifier.Classify(request, timeout=10)
    assert (response.model, response.version, response.id) == ("mnist", "1", "x1")
    assert [p.label for p in response.predictions] == labels.tolist()
    for p in response.predictions:
        assert len(p.probabilities) == 10 and abs(sum(p.probabilities) - 1) < 1e-4
        assert p.confidence == max(p.probabilities) and p.top_k[0].label == p.label
        assert (
            len(p.top_k) == 3 and p.top_k[0].probability >= p.top_k[1].probability >= p.top_k[2].probability
        )


def test_classify_stream_reports_errors_in_band(classifier, confident) -> None:
    images, labels = confident
    requests = [
        pb.ClassifyRequest(model="mnist", id="ok1", images=[pb.Image(pixels=images[0].tobytes())]),
        pb.ClassifyRequest(model="mnist", id="junk", images=[pb.Image(encoded=b"not an image")]),
        pb.ClassifyRequest(model="nope", id="missing", images=[pb.Image(pixels=images[0].tobytes())]),
        pb.ClassifyRequest(
            model="mnist", id="ok2", version="1", images=[pb.Image(pixels=images[1].tobytes())]
        ),
    ]
    responses = list(classifier.ClassifyStream(iter(requests), timeout=10))
    assert [r.id for r in responses] == ["ok1", "junk", "missing", "ok2"]
    assert [r.WhichOneof("result") for r in responses] == ["response", "error", "error", "response"]
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "cannot identify image" in responses[1].error.message
    assert responses[2].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert responses[0].response.predictions[0].label == labels[0]
    assert responses[3].response.predictions[0].label == labels[1]


def test_client_accepts_paths_bytes_arrays_and_pil(server, confident, tmp_path: Path) -> None:
    images, labels = confident
    path = tmp_path / "digit.png"
    path.write_bytes(png(images[0]))
    inputs = [
        path,
        str(path),
        png(images[1]),
        images[2],
        Image.fromarray(images[3]),
        Image.fromarray(255 - images[4]),
    ]
    with MnistClient(server.target) as client:
        result = client.classify(inputs, top_k=2)
    assert result.model == "mnist" and result.version == "1"
    assert [p.label for p in result.predictions] == [labels[0], labels[0], *labels[1:5]]
    assert all(len(p.top_k) == 2 and len(p.probabilities) == 10 for p in result.predictions)


def test_image_convention() -> None:
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255  # a white "1" on black: already MNIST form
    np.testing.assert_array_equal(to_mnist(Image.fromarray(digit)), digit)
    np.testing.assert_array_equal(to_mnist(Image.fromarray(255 - digit)), digit)  # dark on light: inverted
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = 255 - digit  # black ink on a transparent canvas
    np.testing.assert_array_equal(to_mnist(Image.fromarray(rgba, "RGBA")), digit)
    big = np.kron(255 - digit, np.ones((4, 4), np.uint8))  # 112x112 dark-on-light, RGB
    converted = to_mnist(Image.fromarray(np.stack([big] * 3, -1)))
    np.testing.assert_array_equal(converted, digit)
    wide = to_mnist(Image.fromarray(np.zeros((10, 40), np.uint8)))
    assert wide.shape == (28, 28) and wide.dtype == np.uint8


def test_decode_rejects_garbage_and_bombs() -> None:
    with pytest.raises(ImageError, match="cannot identify"):
        decode_image(b"\x89PNG\r\n\x1a\n truncated", max_pixels=10**6)
    bomb = io.BytesIO()
    Image.new("L", (5000, 5000)).save(bomb, format="PNG")  # ~25 KB declaring 25 Mpixel
    with pytest.raises(ImageError, match="above the limit"):
        decode_image(bomb.getvalue(), max_pixels=4096 * 4096)


def predict(*args: str) -> subprocess.CompletedProcess:
    """The mnist-predict console script in its own process."""
    command = [str(Path(sys.executable).with_name("mnist-predict")), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def predict_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """mnist-predict's main() in this process: its exit status, stdout and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        client_main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, exit_info.value.code, out, err)


def test_mnist_predict_png_and_jpeg(server, confident, tmp_path: Path) -> None:
    images, labels = confident
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(tmp_path / f"{i:02d}-{label}.png")
        Image.fromarray(255 - image).convert("RGB").save(tmp_path / f"{i:02d}-{label}.jpg", quality=95)
    done = predict(str(tmp_path), "--server", server.target, "--top-k", "2")
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert len(rows) == 2 * len(images)
    for path, digit, confidence, top in rows:
        assert digit == Path(path).stem.split("-")[1], path
        assert 0 < float(confidence) <= 1 and len(top.split()) == 2
    as_json = predict(str(tmp_path / f"00-{labels[0]}.png"), "--server", server.target, "--json")
    row = json.loads(as_json.stdout)
    assert row["label"] == labels[0] and len(row["probabilities"]) == 10 and len(row["top_k"]) == 3


def test_mnist_predict_errors_are_one_line(server, confident, tmp_path: Path, capsys) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(png(confident[0][0]))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    done = predict_here(
        capsys, str(good), str(junk), str(tmp_path / "missing.png"), "--server", server.target
    )
    assert done.returncode == 1
    assert len(done.stdout.splitlines()) == 1 and done.stdout.startswith(str(good))
    errors = done.stderr.splitlines()
    assert len(errors) == 2 and "Traceback" not in done.stderr
    assert "cannot read" in done.stderr and "missing.png" in done.stderr
    assert "junk.png: INVALID_ARGUMENT" in done.stderr
    unreachable = predict_here(capsys, str(good), "--server", "127.0.0.1:1", "--timeout", "3")
    assert unreachable.returncode == 1 and "Traceback" not in unreachable.stderr
    assert unreachable.stderr.count("\n") == 1 and "cannot reach server 127.0.0.1:1" in unreachable.stderr
    unknown = predict_here(capsys, str(good), "--server", server.target, "--model", "nope")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr and unknown.stderr.count("\n") == 1
