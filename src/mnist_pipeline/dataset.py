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
# Size limit of an uploaded object, checked before it is downloaded.
MAX_OBJECT_BYTES = 1024**3
# Uncompressed size limit, checked before decompressing: MNIST is 55 MB.
MAX_UNCOMPRESSED_BYTES = 2 * 1024**3

_NPY_MAGIC = b"\x93NUMPY"
_UINT8_DESCRS = ("|u1", "<u1", ">u1")
_CHUNK_BYTES = 1 << 20

FIX_HINT = "Create the dataset with `mnist-pipeline upload` or `save_dataset`."


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


def _invalid(problem: str) -> InvalidDatasetError:
    return InvalidDatasetError(f"{problem}. {FIX_HINT}")


def _read_npy_header(stream: IO[bytes], name: str) -> tuple[str, bool, tuple]:
    """Read the header of one ``.npy`` member and return (descr, fortran, shape)."""
    prefix = stream.read(8)
    if len(prefix) < 8 or not prefix.startswith(_NPY_MAGIC):
        raise _invalid(f"{name} is not a .npy array")

    major = prefix[6]
    if major == 1:
        (header_len,) = struct.unpack("<H", stream.read(2))
    elif major in (2, 3):
        (header_len,) = struct.unpack("<I", stream.read(4))
    else:
        raise _invalid(f"{name} uses unknown .npy format version {major}")

    encoding = "utf-8" if major == 3 else "latin1"
    try:
        # The header is a Python dict literal; literal_eval runs no code.
        header = ast.literal_eval(stream.read(header_len).decode(encoding))
        descr = header["descr"]
        fortran_order = header["fortran_order"]
        shape = tuple(header["shape"])
    except (SyntaxError, ValueError, KeyError, TypeError) as exc:
        raise _invalid(f"{name} has a malformed .npy header") from exc

    return descr, fortran_order, shape


def _iter_chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while chunk := stream.read(_CHUNK_BYTES):
        yield chunk


def _check_member(
    archive: zipfile.ZipFile, name: str, ndim: int
) -> tuple[tuple, bytes | None]:
    """Validate one array and return its shape, and its bytes for labels."""
    with archive.open(f"{name}.npy") as stream:
        descr, fortran_order, shape = _read_npy_header(stream, name)
        if descr not in _UINT8_DESCRS:
            raise _invalid(
                f"{name} has dtype {descr!r}, expected uint8 ('|u1'); "
                "object and pickled arrays are never accepted"
            )
        if fortran_order:
            raise _invalid(f"{name} is stored in Fortran order, expected C order")
        if len(shape) != ndim:
            raise _invalid(f"{name} has shape {shape}, expected {ndim} dimensions")
        if ndim == 3 and shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise _invalid(
                f"{name} has images of {shape[1]}x{shape[2]} pixels, "
                f"expected {IMAGE_SIZE}x{IMAGE_SIZE}"
            )

        expected_bytes = 1
        for size in shape:
            expected_bytes *= size

        # Reading to the end also makes zipfile verify the member's CRC.
        kept = bytearray() if ndim == 1 else None
        read_bytes = 0
        for chunk in _iter_chunks(stream):
            read_bytes += len(chunk)
            if kept is not None:
                kept += chunk

    if read_bytes != expected_bytes:
        raise _invalid(
            f"{name} contains {read_bytes} bytes of data, expected {expected_bytes} "
            f"for shape {shape}"
        )

    return shape, bytes(kept) if kept is not None else None


def _class_counts(labels: bytes, name: str) -> list[int]:
    counts = [0] * 256
    for label in labels:
        counts[label] += 1

    out_of_range = [value for value in range(NUM_CLASSES, 256) if counts[value]]
    if out_of_range:
        raise _invalid(
            f"{name} contains labels {out_of_range[:5]} outside 0-{NUM_CLASSES - 1}"
        )

    return counts[:NUM_CLASSES]


def check_dataset(source: str | os.PathLike | IO[bytes]) -> DatasetSummary:
    """Validate a dataset object and return its sizes and label counts.

    Uses only the standard library. Reads every byte, so a truncated or
    corrupted object fails here rather than on the trainer.

    Raises
    ------
    InvalidDatasetError
        With a message that names the problem and how to fix it.
    """
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise _invalid(
            "The object is not a readable .npz archive (empty, truncated or "
            "another format)"
        ) from exc

    with archive:
        members = {info.filename: info for info in archive.infolist()}
        expected = {f"{name}.npy" for name in ARRAY_NAMES}
        missing = sorted(expected - members.keys())
        unexpected = sorted(members.keys() - expected)
        if missing:
            raise _invalid(f"The archive is missing arrays {missing}")
        if unexpected:
            raise _invalid(f"The archive contains unexpected entries {unexpected}")

        total = sum(info.file_size for info in members.values())
        if total > MAX_UNCOMPRESSED_BYTES:
            raise _invalid(
                f"The arrays take {total} bytes uncompressed, more than the "
                f"limit of {MAX_UNCOMPRESSED_BYTES}"
            )

        try:
            x_train, _ = _check_member(archive, "x_train", ndim=3)
            y_train, train_labels = _check_member(archive, "y_train", ndim=1)
            x_test, _ = _check_member(archive, "x_test", ndim=3)
            y_test, test_labels = _check_member(archive, "y_test", ndim=1)
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise _invalid(f"The archive is corrupted: {exc}") from exc

    for split, images, labels in (
        ("train", x_train, y_train),
        ("test", x_test, y_test),
    ):
        if images[0] != labels[0]:
            raise _invalid(
                f"x_{split} has {images[0]} images but y_{split} has {labels[0]} labels"
            )

    if x_train[0] < MIN_TRAIN_SIZE:
        raise _invalid(
            f"The train split has {x_train[0]} images, fewer than {MIN_TRAIN_SIZE}"
        )
    if x_test[0] < MIN_TEST_SIZE:
        raise _invalid(
            f"The test split has {x_test[0]} images, fewer than {MIN_TEST_SIZE}"
        )

    return DatasetSummary(
        train_size=x_train[0],
        test_size=x_test[0],
        train_class_counts=_class_counts(train_labels, "y_train"),
        test_class_counts=_class_counts(test_labels, "y_test"),
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
        if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.integer):
            raise _invalid(f"{name} has dtype {array.dtype}, expected integers")
        if array.size and (array.min() < 0 or array.max() > 255):
            raise _invalid(f"{name} has values outside 0-255")
        arrays[name] = np.ascontiguousarray(array, dtype=np.uint8)

    np.savez_compressed(target, **arrays)


def load_dataset(source: str | os.PathLike | IO[bytes]) -> Dataset:
    """Load a dataset object into NumPy arrays without unpickling."""
    import numpy as np  # The Lambda package has no NumPy; only callers here do.

    with np.load(source, allow_pickle=False) as npz:
        return Dataset(*(npz[name] for name in ARRAY_NAMES))
