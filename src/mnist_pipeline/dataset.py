"""The dataset format: one ``.npz`` object per upload.

A dataset is a zip archive in NumPy's ``.npz`` layout, the same layout as
Keras' ``mnist.npz``, holding exactly four arrays:

==========  ================  =====  =====================
name        shape             dtype  values
==========  ================  =====  =====================
x_train     (N, 28, 28)       uint8  0 background, 255 ink
y_train     (N,)              uint8  digit 0-9
x_test      (M, 28, 28)       uint8  as x_train
y_test      (M,)              uint8  as y_train
==========  ================  =====  =====================

`save_dataset` writes it compressed (about 11 MB for the 70,000 MNIST
digits). `check_dataset` validates an object with the standard library
alone, so the launcher Lambda can reject a bad upload before a GPU instance
starts without shipping NumPy. `load_dataset` reads it with NumPy and never
unpickles.
"""

import ast
import dataclasses
import hashlib
import math
import os
import struct
import zipfile
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, NamedTuple

from mnist_pipeline.exceptions import InvalidDatasetError

if TYPE_CHECKING:
    import numpy as np

IMAGE_SIZE = 28
NUM_CLASSES = 10
ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")
MIN_TRAIN_SIZE = 1_000
MIN_TEST_SIZE = 100
# A train split whose largest class exceeds its smallest by this factor gets
# a warning (MNIST's ratio is 1.24).
IMBALANCE_RATIO = 3
# Size limit of an uploaded object, checked before it is downloaded.
MAX_OBJECT_BYTES = 1024**3
# Uncompressed size limit, checked before decompressing: MNIST is 55 MB.
MAX_UNCOMPRESSED_BYTES = 2 * 1024**3

_NPY_MAGIC = b"\x93NUMPY"
_HEADER_KEYS = {"descr", "fortran_order", "shape"}
_MAX_HEADER_BYTES = 10_000
_UINT8_DESCRS = ("|u1", "<u1", ">u1")
_CHUNK_BYTES = 1 << 20

FIX_HINT = (
    "Package the data with `mnist-pipeline upload SOURCE`, which writes and "
    "checks this format"
)


class Dataset(NamedTuple):
    x_train: "np.ndarray"
    y_train: "np.ndarray"
    x_test: "np.ndarray"
    y_test: "np.ndarray"


@dataclasses.dataclass(frozen=True)
class DatasetSummary:
    """Sizes and label counts of a dataset that passed `check_dataset`."""

    train_size: int
    test_size: int
    train_class_counts: list[int]
    test_class_counts: list[int]
    warnings: list[str] = dataclasses.field(default_factory=list)


def _invalid(problem: str) -> InvalidDatasetError:
    return InvalidDatasetError(f"{problem}. {FIX_HINT}.")


def _read_npy_header(stream: IO[bytes], name: str) -> tuple[str, tuple[int, ...]]:
    """Read one ``.npy`` member's header and return its dtype and shape.

    Accepts exactly what ``numpy.load(allow_pickle=False)`` accepts for a
    C-ordered array: format versions 1.0, 2.0 and 3.0, a header of at most
    10,000 bytes (NumPy's default ``max_header_size``) and a dict with the
    keys descr, fortran_order and shape.
    """
    prefix = stream.read(8)
    if len(prefix) < 8 or not prefix.startswith(_NPY_MAGIC):
        raise _invalid(f"{name} is not a .npy array")

    version = (prefix[6], prefix[7])
    if version == (1, 0):
        (header_len,) = struct.unpack("<H", stream.read(2))
    elif version in ((2, 0), (3, 0)):
        (header_len,) = struct.unpack("<I", stream.read(4))
    else:
        raise _invalid(f"{name} uses unsupported .npy format version {version}")
    if header_len > _MAX_HEADER_BYTES:
        raise _invalid(
            f"{name} has a {header_len}-byte .npy header, more than the "
            f"{_MAX_HEADER_BYTES} bytes NumPy reads"
        )

    encoding = "utf-8" if version == (3, 0) else "latin1"
    try:
        # The header is a Python dict literal; literal_eval runs no code.
        header = ast.literal_eval(stream.read(header_len).decode(encoding))
    except (
        SyntaxError,
        ValueError,
        TypeError,
        UnicodeDecodeError,
        RecursionError,
        MemoryError,
    ) as exc:
        raise _invalid(f"{name} has a malformed .npy header") from exc

    if not isinstance(header, dict) or header.keys() != _HEADER_KEYS:
        raise _invalid(
            f"{name} has a .npy header without exactly the keys "
            "descr, fortran_order and shape"
        )
    shape = header["shape"]
    valid_shape = isinstance(shape, tuple) and all(
        type(size) is int and size >= 0 for size in shape
    )
    if not valid_shape:
        raise _invalid(f"{name} has invalid shape {shape!r:.60}")
    if header["fortran_order"] is not False:
        raise _invalid(f"{name} is stored in Fortran order, expected C order")

    return header["descr"], shape


def _declared_shape(archive: zipfile.ZipFile, name: str, ndim: int) -> tuple[int, ...]:
    """Check one array's header against the format and its member's size."""
    info = archive.getinfo(f"{name}.npy")
    with archive.open(info) as stream:
        descr, shape = _read_npy_header(stream, name)
        header_bytes = stream.tell()
    if descr not in _UINT8_DESCRS:
        raise _invalid(
            f"{name} has dtype {descr!r}, expected uint8 ('|u1'); "
            "object and pickled arrays are never accepted"
        )
    if len(shape) != ndim:
        raise _invalid(f"{name} has shape {shape}, expected {ndim} dimensions")
    if ndim == 3 and shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise _invalid(
            f"{name} has images of {shape[1]}x{shape[2]} pixels, "
            f"expected {IMAGE_SIZE}x{IMAGE_SIZE}"
        )

    # The declared shape must match the member's size before any data is
    # read, so a small upload cannot claim a huge array.
    data_bytes = math.prod(shape)
    if header_bytes + data_bytes != info.file_size:
        raise _invalid(
            f"{name} contains {info.file_size - header_bytes} bytes of data, "
            f"expected {data_bytes} for shape {shape}"
        )

    return shape


def _read_labels(archive: zipfile.ZipFile, name: str) -> list[int]:
    """Read a label array to its end and return how often each byte occurs.

    Reading to the end makes zipfile verify the member's size and CRC.
    """
    counts = [0] * 256
    with archive.open(f"{name}.npy") as stream:
        _read_npy_header(stream, name)
        for chunk in _iter_chunks(stream):
            for value in set(chunk):
                counts[value] += chunk.count(value)

    return counts


def _read_image_digests(archive: zipfile.ZipFile, name: str) -> list[bytes]:
    """Read an image array to its end and return an 8-byte digest per image."""
    image_bytes = IMAGE_SIZE * IMAGE_SIZE
    digests = []
    pending = b""
    with archive.open(f"{name}.npy") as stream:
        _read_npy_header(stream, name)
        for chunk in _iter_chunks(stream):
            pending += chunk
            whole = len(pending) - len(pending) % image_bytes
            for start in range(0, whole, image_bytes):
                image = pending[start : start + image_bytes]
                digests.append(hashlib.blake2b(image, digest_size=8).digest())
            pending = pending[whole:]

    return digests


def _data_warnings(
    train_digests: list[bytes],
    test_digests: list[bytes],
    train_counts: list[int],
) -> list[str]:
    """Describe problems that do not block training but weaken its result."""
    warnings = []
    smallest, largest = min(train_counts), max(train_counts)
    if largest > IMBALANCE_RATIO * smallest:
        warnings.append(
            f"Strong class imbalance in y_train: the largest class has {largest} "
            f"images, the smallest {smallest}."
        )
    repeated_train = len(train_digests) - len(set(train_digests))
    if repeated_train:
        warnings.append(f"x_train repeats {repeated_train} images.")
    repeated_test = len(test_digests) - len(set(test_digests))
    if repeated_test:
        warnings.append(f"x_test repeats {repeated_test} images.")
    leaked = len(set(test_digests) & set(train_digests))
    if leaked:
        warnings.append(
            f"{leaked} x_test images also appear in x_train, so the test accuracy "
            "overstates how well the model generalizes."
        )

    return warnings


def _iter_chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while chunk := stream.read(_CHUNK_BYTES):
        yield chunk


def _class_counts(counts: list[int], name: str) -> list[int]:
    out_of_range = [value for value in range(NUM_CLASSES, 256) if counts[value]]
    if out_of_range:
        raise _invalid(
            f"{name} contains labels {out_of_range[:5]} outside 0-{NUM_CLASSES - 1}"
        )

    missing = [digit for digit in range(NUM_CLASSES) if counts[digit] == 0]
    if missing:
        raise _invalid(
            f"{name} has no examples of digits {missing}; both splits must contain "
            "every digit, or their accuracy says nothing about those digits"
        )

    return counts[:NUM_CLASSES]


def check_dataset(source: str | os.PathLike | IO[bytes]) -> DatasetSummary:
    """Validate a dataset object and return its sizes and label counts.

    ``source`` is a path or a seekable binary file, read from its start.

    Uses only the standard library and keeps at most about one 1 MiB chunk
    of an array in memory. Reads every byte, so a truncated or corrupted
    object fails here rather than on the trainer.

    Raises
    ------
    InvalidDatasetError
        With a message that names the problem and how to fix it.
    """
    try:
        return _check_archive(source)
    except InvalidDatasetError:
        raise
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        EOFError,
        OSError,
        RuntimeError,
        NotImplementedError,
        ValueError,
        TypeError,
        UnicodeDecodeError,
    ) as exc:
        # zipfile raises all of these on damaged or exotic archives
        # (encrypted members, unknown compression, broken directories).
        raise _invalid(f"The archive is unreadable or corrupted ({exc})") from exc


def _check_archive(source: str | os.PathLike | IO[bytes]) -> DatasetSummary:
    opened = None
    if isinstance(source, str | os.PathLike):
        source = opened = open(source, "rb")  # noqa: SIM115 - closed below
    try:
        # numpy.load distinguishes an .npz from a .npy or a pickle by its
        # first bytes, so the archive must start with a zip entry.
        source.seek(0)
        magic = source.read(4)
        source.seek(0)
        not_npz = _invalid(
            "The object is not a readable .npz archive (empty, truncated or "
            "another format)"
        )
        if magic != b"PK\x03\x04":
            raise not_npz
        try:
            archive = zipfile.ZipFile(source)
        except zipfile.BadZipFile as exc:
            raise not_npz from exc
        with archive:
            return _check_members(archive)
    finally:
        if opened is not None:
            opened.close()


def _check_members(archive: zipfile.ZipFile) -> DatasetSummary:
    names = [info.filename for info in archive.infolist()]
    expected = {f"{name}.npy" for name in ARRAY_NAMES}
    missing = sorted(expected - set(names))
    unexpected = sorted(set(names) - expected)
    if missing:
        raise _invalid(f"The archive is missing arrays {missing}")
    if unexpected:
        raise _invalid(f"The archive contains unexpected entries {unexpected}")
    if len(names) != len(set(names)):
        raise _invalid(f"The archive contains repeated entries {sorted(names)}")

    total = sum(info.file_size for info in archive.infolist())
    if total > MAX_UNCOMPRESSED_BYTES:
        raise _invalid(
            f"The arrays take {total} bytes uncompressed, more than the "
            f"limit of {MAX_UNCOMPRESSED_BYTES}"
        )

    x_train = _declared_shape(archive, "x_train", ndim=3)
    y_train = _declared_shape(archive, "y_train", ndim=1)
    x_test = _declared_shape(archive, "x_test", ndim=3)
    y_test = _declared_shape(archive, "y_test", ndim=1)

    for split, images, labels in (
        ("train", x_train, y_train),
        ("test", x_test, y_test),
    ):
        if images[0] != labels[0]:
            raise _invalid(
                f"x_{split} has {images[0]} images but y_{split} has {labels[0]} labels"
            )

    if x_train[0] < MIN_TRAIN_SIZE:
        raise InvalidDatasetError(
            f"The train split has {x_train[0]} images, fewer than "
            f"{MIN_TRAIN_SIZE}. Upload a dataset with more training digits."
        )
    if x_test[0] < MIN_TEST_SIZE:
        raise InvalidDatasetError(
            f"The test split has {x_test[0]} images, fewer than "
            f"{MIN_TEST_SIZE}. Upload a dataset with more test digits."
        )

    train_digests = _read_image_digests(archive, "x_train")
    test_digests = _read_image_digests(archive, "x_test")
    train_counts = _class_counts(_read_labels(archive, "y_train"), "y_train")
    test_counts = _class_counts(_read_labels(archive, "y_test"), "y_test")

    return DatasetSummary(
        train_size=x_train[0],
        test_size=x_test[0],
        train_class_counts=train_counts,
        test_class_counts=test_counts,
        warnings=_data_warnings(train_digests, test_digests, train_counts),
    )


def save_dataset(
    target: str | os.PathLike | IO[bytes],
    x_train: "np.ndarray",
    y_train: "np.ndarray",
    x_test: "np.ndarray",
    y_test: "np.ndarray",
) -> None:
    """Write arrays in the dataset format, compressed.

    Images must be uint8 0-255 (0 background) of 28x28 and labels integers
    0-9; they are cast to uint8 here.
    """
    import numpy as np  # The Lambda package has no NumPy; only callers here do.

    arrays = {}
    for name, array in zip(
        ARRAY_NAMES, (x_train, y_train, x_test, y_test), strict=True
    ):
        array = np.asarray(array)
        # The caller is already packaging, so these errors name a conversion.
        if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.integer):
            raise InvalidDatasetError(
                f"{name} has dtype {array.dtype}, expected integers: pixels 0-255 "
                "and labels 0-9. Convert pixels scaled to 0-1 with "
                "(x * 255).round().astype('uint8') before packaging."
            )
        if array.size and (array.min() < 0 or array.max() > 255):
            raise InvalidDatasetError(
                f"{name} has values from {array.min()} to {array.max()}, outside "
                "0-255; rescale the pixels to 0-255 before packaging."
            )
        arrays[name] = np.ascontiguousarray(array, dtype=np.uint8)

    np.savez_compressed(target, **arrays)


def load_dataset(source: str | os.PathLike | IO[bytes]) -> Dataset:
    """Load a dataset object into NumPy arrays without unpickling."""
    import numpy as np  # The Lambda package has no NumPy; only callers here do.

    with np.load(source, allow_pickle=False) as npz:
        return Dataset(*(npz[name] for name in ARRAY_NAMES))
