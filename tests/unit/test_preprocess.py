import contextlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from mnist_server.preprocess import InvalidImageError, preprocess, to_mnist
from PIL import Image


def encode(image: Image.Image, format="PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def as_user_photo(digit: np.ndarray, size=280, offset=(30, -40)) -> Image.Image:
    """Render an MNIST digit as users send theirs: black on white, large, off-centre."""
    ink = Image.fromarray(255 - digit).resize((size // 2, size // 2), Image.BICUBIC)
    paper = Image.new("L", (size, size), 255)
    paper.paste(ink, (size // 4 + offset[0], size // 4 + offset[1]))
    return paper


def center_of_mass(image: np.ndarray) -> tuple[float, float]:
    total = image.sum()
    rows, cols = np.indices(image.shape)
    return (rows * image).sum() / total, (cols * image).sum() / total


def test_mnist_digit_keeps_shape_and_centre(small_mnist):
    for digit in small_mnist.x_test[:20]:
        result = to_mnist(Image.fromarray(digit))

        assert result.shape == (28, 28)
        assert result.dtype == np.uint8
        row, col = center_of_mass(result.astype(float))
        assert abs(row - 14) <= 0.5
        assert abs(col - 14) <= 0.5
        # The digit already fits MNIST's box and centre, so it stays put;
        # only stretching the brightest ink to 255 changes levels slightly.
        assert np.abs(result.astype(int) - digit.astype(int)).max() <= 3


def test_user_photo_becomes_mnist_like(small_mnist):
    digit = small_mnist.x_test[0]
    photo = as_user_photo(digit)

    result = preprocess(encode(photo.convert("RGB"), "JPEG", quality=90))

    row, col = center_of_mass(result.astype(float))
    assert abs(row - 14) <= 0.5
    assert abs(col - 14) <= 0.5
    assert result[0].max() == 0  # dark background
    assert result[:, 0].max() == 0
    rows = np.flatnonzero(result.max(axis=1) > 25)
    cols = np.flatnonzero(result.max(axis=0) > 25)
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 in (19, 20, 21)


def test_transparent_background_is_composited(small_mnist):
    digit = small_mnist.x_test[1]
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = digit  # black ink, transparency elsewhere

    result = preprocess(encode(Image.fromarray(rgba, "RGBA")))

    assert result.max() == 255
    assert result[0].max() == 0


def test_sixteen_bit_image_is_scaled(small_mnist):
    digit16 = small_mnist.x_test[2].astype(np.uint16) * 257

    result = preprocess(encode(Image.fromarray(digit16)))
    reference = preprocess(encode(Image.fromarray(small_mnist.x_test[2])))

    assert np.abs(result.astype(int) - reference.astype(int)).max() <= 2


def test_exif_rotation_is_applied(small_mnist):
    photo = as_user_photo(small_mnist.x_test[3]).convert("RGB")
    rotated = photo.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera's frame, rotated 90 degrees clockwise to display

    result = preprocess(encode(rotated, "JPEG", exif=exif.tobytes()))
    reference = preprocess(encode(photo, "JPEG"))

    assert np.abs(result.astype(int) - reference.astype(int)).mean() < 12


@pytest.mark.parametrize("size", [12000, 20000])
def test_decompression_bomb_is_refused(size):
    bomb = encode(Image.new("1", (size, size)))

    with pytest.raises(InvalidImageError, match="pixels.* limit of 25000000"):
        preprocess(bomb)


def test_truncated_image_is_refused(small_mnist):
    data = encode(as_user_photo(small_mnist.x_test[0]))

    with pytest.raises(InvalidImageError, match="truncated or corrupt"):
        preprocess(data[: len(data) // 2])


def test_nan_float_image_is_handled():
    pixels = np.full((28, 28), 255, np.float32)
    pixels[5:20, 12:15] = 0
    pixels[10, 13] = np.nan

    result = preprocess(encode(Image.fromarray(pixels, mode="F"), "TIFF"))

    assert result.max() > 128
    assert np.isfinite(result).all()


def test_tiny_float_peak_is_stretched():
    # 255 / 1e-38 overflows float32.
    pixels = np.zeros((28, 28), np.float32)
    pixels[6:22, 13:15] = 1e-38

    result = preprocess(encode(Image.fromarray(pixels, mode="F"), "TIFF"))

    assert result.max() == 255
    assert result[0].max() == 0


@pytest.mark.parametrize("size", [(600, 3000), (3000, 600), (700, 4000)])
def test_tall_sixteen_bit_image_is_read(size):
    # Pillow cannot reduce 16-bit images by a different factor per axis.
    width, height = size
    paper = np.full((height, width), 65535, np.uint16)
    paper[height // 10 : -height // 10, width // 3 : -width // 3] = 0

    result = preprocess(encode(Image.fromarray(paper)))

    assert result.max() == 255
    assert result[0].max() == 0


@pytest.mark.parametrize("format", ["ICO", "IM", "SPIDER", "PCX"])
def test_rare_formats_are_refused_before_decoding(format):
    # Pillow's ICO reader decodes the whole embedded image while opening
    # it, so a file that declares 16x16 could hold 13000x13000 pixels.
    # SPIDER stores only float images.
    image = Image.new("F" if format == "SPIDER" else "L", (16, 16), 1)

    with pytest.raises(InvalidImageError, match="not an image format"):
        preprocess(encode(image, format))


def test_malformed_tiff_tag_is_refused():
    # A TIFF whose tag contains a fraction where Pillow expects an integer,
    # so the decoder raises TypeError.
    data = (Path(__file__).parent / "data" / "rational-tag.tif").read_bytes()

    with pytest.raises(InvalidImageError, match="could not be decoded"):
        preprocess(data)


def test_premultiplied_alpha_tiff_gets_clear_error():
    # Pillow reads greyscale with associated alpha (ExtraSamples 1) as mode
    # "La", which it cannot convert to RGBA.
    data = bytearray(encode(Image.new("LA", (28, 28), (0, 255)), "TIFF"))
    extra_samples = data.find(struct.pack("<HHI", 338, 3, 1))
    data[extra_samples + 8 : extra_samples + 10] = struct.pack("<H", 1)

    with pytest.raises(InvalidImageError, match="pixel mode La"):
        preprocess(bytes(data))


def test_jpeg_with_many_scans_is_refused(small_mnist):
    # Repeating a progressive JPEG's last scan keeps the file valid and
    # makes libjpeg decode the whole image once per copy.
    photo = as_user_photo(small_mnist.x_test[0])
    data = encode(photo, "JPEG", progressive=True)
    last_scan = data.rindex(b"\xff\xda")
    scan = data[last_scan:-2]
    bomb = data[:-2] + scan * 150 + data[-2:]

    with pytest.raises(InvalidImageError, match="JPEG has 1.. scans"):
        preprocess(bomb)
    assert preprocess(data).max() == 255


def test_tiff_with_huge_tiles_is_refused():
    # A 100x100 image in one deflated 8192x8192 tile: 4 MB of tile for 10,000
    # pixels.
    tile = zlib.compress(bytes(8192 * 8192), 9)
    tags = [
        (256, 4, 100),  # ImageWidth
        (257, 4, 100),  # ImageLength
        (258, 3, 8),  # BitsPerSample
        (259, 3, 8),  # Compression: deflate
        (262, 3, 1),  # PhotometricInterpretation: black is zero
        (277, 3, 1),  # SamplesPerPixel
        (322, 4, 8192),  # TileWidth
        (323, 4, 8192),  # TileLength
        (324, 4, 0),  # TileOffsets, set below
        (325, 4, len(tile)),  # TileByteCounts
    ]
    tile_offset = 8 + 2 + 12 * len(tags) + 4
    entries = b"".join(
        struct.pack("<HHI", tag, kind, 1)
        + (
            struct.pack("<I", tile_offset if tag == 324 else value)
            if kind == 4
            else struct.pack("<HH", value, 0)
        )
        for tag, kind, value in tags
    )
    data = b"II*\0" + struct.pack("<IH", 8, len(tags)) + entries + b"\0\0\0\0" + tile

    with pytest.raises(InvalidImageError, match="tiles are 8192x8192 pixels"):
        preprocess(data)


def test_large_blank_image_is_refused_cheaply():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InvalidImageError, match="blank"):
        preprocess(encode(Image.new("RGB", (5000, 5000), "white")))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    # ru_maxrss is in KiB on Linux: the peak grew by less than 300 MiB.
    assert after - before < 300 * 1024


def test_tightly_cropped_ones_are_mostly_found(small_mnist):
    ones = small_mnist.x_test[small_mnist.y_test == 1]
    found = 0
    for digit in ones:
        rows = np.flatnonzero(digit.max(axis=1))
        cols = np.flatnonzero(digit.max(axis=0))
        crop = 255 - digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        with contextlib.suppress(InvalidImageError):
            found += preprocess(encode(Image.fromarray(crop))).max() > 128

    assert found >= 0.9 * len(ones)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 108, 111])
def test_median_matches_numpy(size):
    from mnist_server.preprocess import _median

    values = np.random.default_rng(size).random(size).astype(np.float32) * 255

    assert _median(values) == pytest.approx(float(np.median(values)), abs=1e-3)


def test_paper_removal_keeps_zero_bordered_digit(small_mnist):
    # to_mnist skips remove_paper for a border of zeros, because it would
    # return such an image unchanged.
    from mnist_server.preprocess import remove_paper

    digits = small_mnist.x_test[:200].astype(np.float32)
    edges = np.concatenate(
        [digits[:, 0], digits[:, -1], digits[:, :, 0], digits[:, :, -1]], axis=1
    )
    zero_bordered = digits[~edges.any(axis=1)]
    assert len(zero_bordered) > 150

    for digit in zero_bordered:
        border = np.zeros(4 * 28, dtype=np.float32)
        np.testing.assert_array_equal(remove_paper(digit.copy(), border), digit)
