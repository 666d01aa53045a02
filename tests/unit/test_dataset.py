import io
import zipfile

import numpy as np
import pytest

from mnist_pipeline.dataset import check_dataset, load_dataset, save_dataset
from mnist_pipeline.exceptions import InvalidDatasetError


def make_arrays(train=1200, test=200, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, test, dtype=np.uint8),
    }


def npz(compressed=True, **arrays) -> io.BytesIO:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    buffer.seek(0)
    return buffer


def test_check_accepts_real_mnist(small_mnist_npz):
    summary = check_dataset(io.BytesIO(small_mnist_npz))

    assert summary.train_size == 3000
    assert summary.test_size == 500
    assert sum(summary.train_class_counts) == 3000
    assert all(count > 0 for count in summary.test_class_counts)


def test_check_accepts_uncompressed():
    assert check_dataset(npz(compressed=False, **make_arrays())).train_size == 1200


def test_save_load_round_trip(small_mnist):
    buffer = io.BytesIO()
    save_dataset(buffer, *small_mnist)
    buffer.seek(0)

    loaded = load_dataset(buffer)

    for original, restored in zip(small_mnist, loaded, strict=True):
        np.testing.assert_array_equal(original, restored)
        assert restored.dtype == np.uint8


def test_real_mnist_packs_to_about_11_mb(mnist):
    buffer = io.BytesIO()
    save_dataset(buffer, *mnist)

    assert 9e6 < buffer.tell() < 13e6


def replace(name, value):
    arrays = make_arrays()
    arrays[name] = value
    return arrays


BAD_DATASETS = {
    "object array": (
        replace("y_train", np.array([object()] * 1200, dtype=object)),
        "object and pickled",
    ),
    "float images": (
        replace("x_train", np.zeros((1200, 28, 28), np.float32)),
        "expected uint8",
    ),
    "int64 labels": (replace("y_test", np.zeros(200, np.int64)), "expected uint8"),
    "wrong image size": (
        replace("x_train", np.zeros((1200, 32, 32), np.uint8)),
        "32x32 pixels",
    ),
    "flat images": (replace("x_test", np.zeros((200, 784), np.uint8)), "3 dimensions"),
    "label out of range": (
        replace("y_train", np.full(1200, 10, np.uint8)),
        "outside 0-9",
    ),
    "count mismatch": (replace("y_train", np.zeros(1100, np.uint8)), "1100 labels"),
    "tiny train split": (
        {
            **make_arrays(),
            "x_train": np.zeros((50, 28, 28), np.uint8),
            "y_train": np.zeros(50, np.uint8),
        },
        "fewer than 1000",
    ),
    "empty test split": (
        {
            **make_arrays(),
            "x_test": np.zeros((0, 28, 28), np.uint8),
            "y_test": np.zeros(0, np.uint8),
        },
        "fewer than 100",
    ),
    "fortran order": (
        replace("x_train", np.asfortranarray(make_arrays()["x_train"])),
        "Fortran",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATASETS))
def test_check_rejects_bad_arrays(case):
    arrays, message = BAD_DATASETS[case]
    source = npz(**arrays)

    with pytest.raises(InvalidDatasetError, match=message) as error:
        check_dataset(source)

    assert "mnist-pipeline upload" in str(error.value)


def test_check_rejects_missing_test_split():
    arrays = make_arrays()
    del arrays["x_test"], arrays["y_test"]

    with pytest.raises(InvalidDatasetError, match="missing arrays"):
        check_dataset(npz(**arrays))


def test_check_rejects_extra_array():
    with pytest.raises(InvalidDatasetError, match="unexpected entries"):
        check_dataset(npz(**make_arrays(), extra=np.zeros(3, np.uint8)))


@pytest.mark.parametrize("data", [b"", b"not a zip file", b"PK\x03\x04garbage"])
def test_check_rejects_non_archives(data):
    with pytest.raises(InvalidDatasetError, match="not a readable .npz"):
        check_dataset(io.BytesIO(data))


def test_check_rejects_truncated_object():
    data = npz(**make_arrays()).getvalue()

    with pytest.raises(InvalidDatasetError):
        check_dataset(io.BytesIO(data[: len(data) // 2]))


def test_check_rejects_corrupted_member():
    data = bytearray(npz(compressed=False, **make_arrays()).getvalue())
    data[5000] ^= 0xFF  # inside x_test's or x_train's pixels: CRC fails

    with pytest.raises(InvalidDatasetError, match="corrupted"):
        check_dataset(io.BytesIO(bytes(data)))


def test_check_rejects_short_member():
    arrays = make_arrays()
    good = npz(compressed=False, **arrays)
    buffer = io.BytesIO()
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(buffer, "w") as target:
        for info in source.infolist():
            body = source.read(info)
            target.writestr(
                info.filename, body[:-100] if "x_train" in info.filename else body
            )
    buffer.seek(0)

    with pytest.raises(InvalidDatasetError, match="bytes of data"):
        check_dataset(buffer)


def test_load_never_unpickles():
    arrays = replace("y_train", np.array([object()] * 1200, dtype=object))
    source = npz(**arrays)

    with pytest.raises(ValueError, match="allow_pickle"):
        load_dataset(source).y_train.sum()
