import contextlib
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

    # Each message names what to do next.
    fix = (
        "Upload a dataset with more"
        if "fewer than" in message
        else "mnist-pipeline upload"
    )
    assert fix in str(error.value)


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


def npy_bytes(header: str, data: bytes, version=(1, 0)) -> bytes:
    """Build a .npy member by hand, header dict literal included."""
    encoded = header.encode("latin1")
    if version == (1, 0):
        return (
            b"\x93NUMPY\x01\x00" + len(encoded).to_bytes(2, "little") + encoded + data
        )
    return (
        b"\x93NUMPY"
        + bytes(version)
        + len(encoded).to_bytes(4, "little")
        + encoded
        + data
    )


def archive_with(name: str, member: bytes) -> io.BytesIO:
    """A valid dataset archive whose ``name`` member is replaced by ``member``."""
    source = npz(compressed=False, **make_arrays())
    buffer = io.BytesIO()
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(buffer, "w") as target:
        for info in original.infolist():
            body = member if info.filename == f"{name}.npy" else original.read(info)
            target.writestr(info.filename, body)
    buffer.seek(0)
    return buffer


LABELS = bytes(range(10)) * 120
HOSTILE_HEADERS = {
    "float shape": (
        "{'descr': '|u1', 'fortran_order': False, 'shape': (1200.0,), }",
        "invalid shape",
    ),
    "list shape": (
        "{'descr': '|u1', 'fortran_order': False, 'shape': [1200], }",
        "invalid shape",
    ),
    "negative shape": (
        "{'descr': '|u1', 'fortran_order': False, 'shape': (-1,), }",
        "invalid shape",
    ),
    "fortran zero": (
        "{'descr': '|u1', 'fortran_order': 0, 'shape': (1200,), }",
        "Fortran order",
    ),
    "extra key": (
        "{'descr': '|u1', 'fortran_order': False, 'shape': (1200,), 'x': 1}",
        "exactly the keys",
    ),
    "not a dict": ("[1, 2, 3]", "exactly the keys"),
    "deep nesting": ("-" * 3000 + "1", "malformed"),
    "huge declared size": (
        "{'descr': '|u1', 'fortran_order': False, 'shape': (600000000,), }",
        "expected 600000000",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_check_rejects_hostile_headers(case):
    header, message = HOSTILE_HEADERS[case]

    with pytest.raises(InvalidDatasetError, match=message):
        check_dataset(archive_with("y_train", npy_bytes(header, LABELS)))


def test_check_rejects_oversized_header():
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (1200,), }"
    member = npy_bytes(header + " " * 20_000, LABELS, version=(2, 0))

    with pytest.raises(InvalidDatasetError, match="more than the 10000 bytes"):
        check_dataset(archive_with("y_train", member))


def test_check_rejects_unknown_npy_version():
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (1200,), }"

    with pytest.raises(InvalidDatasetError, match=r"version \(1, 5\)"):
        check_dataset(
            archive_with("y_train", npy_bytes(header, LABELS, version=(1, 5)))
        )


def test_check_rejects_missing_digit():
    arrays = make_arrays()
    arrays["y_test"] = np.ones(200, np.uint8)

    with pytest.raises(
        InvalidDatasetError, match=r"y_test has no examples of digits \[0, 2"
    ):
        check_dataset(npz(**arrays))


def test_check_rejects_bytes_before_archive():
    data = npz(**make_arrays()).getvalue()

    with pytest.raises(InvalidDatasetError, match="not a readable .npz"):
        check_dataset(io.BytesIO(b"junk" + data))


def test_check_rejects_encrypted_member():
    data = bytearray(npz(compressed=False, **make_arrays()).getvalue())
    directory = data.rfind(b"PK\x01\x02")
    data[directory + 8] |= 0x01  # general purpose flag: encrypted

    with pytest.raises(InvalidDatasetError, match="unreadable or corrupted"):
        check_dataset(io.BytesIO(bytes(data)))


def test_check_raises_only_invalid_dataset_on_damage():
    # Flip bytes across the whole archive: every outcome is a pass or a
    # clear rejection, never another exception.
    data = npz(**make_arrays(train=1000, test=100)).getvalue()
    rng = np.random.default_rng(7)
    for position in rng.integers(0, len(data), 300):
        damaged = bytearray(data)
        damaged[position] ^= int(rng.integers(1, 256))
        with contextlib.suppress(InvalidDatasetError):
            check_dataset(io.BytesIO(bytes(damaged)))


def test_check_agrees_with_numpy_on_valid_data():
    source = npz(**make_arrays())
    check_dataset(source)
    source.seek(0)

    dataset = load_dataset(source)

    assert dataset.x_train.shape == (1200, 28, 28)


def test_real_mnist_has_no_warnings(small_mnist_npz):
    assert check_dataset(io.BytesIO(small_mnist_npz)).warnings == []


def test_imbalance_is_warned_not_rejected():
    arrays = make_arrays()
    arrays["y_train"] = np.concatenate(
        [np.zeros(1000, np.uint8), np.arange(200, dtype=np.uint8) % 10]
    )

    summary = check_dataset(npz(**arrays))

    assert summary.train_size == 1200
    assert any("Strong class imbalance" in w for w in summary.warnings)


def test_repeated_and_leaked_images_are_warned():
    arrays = make_arrays()
    arrays["x_train"][1] = arrays["x_train"][0]
    arrays["x_test"][:3] = arrays["x_train"][10:13]

    warnings = check_dataset(npz(**arrays)).warnings

    assert "x_train repeats 1 images." in warnings
    assert any(w.startswith("3 x_test images also appear in x_train") for w in warnings)
