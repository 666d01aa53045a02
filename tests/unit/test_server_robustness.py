"""Robustness of the server: API fuzzing, decoder fuzzing and memory use.

The API and memory tests serve the model of the session fixture ``trained``,
so they need real MNIST (``MNIST_DIR``). The preprocess tests need no data.
All generated inputs are derandomized, so a run repeats the previous one.
"""

import gc
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mnist_server.app import create_app
from mnist_server.preprocess import InvalidImageError, preprocess
from PIL import Image, ImageDraw
from schemathesis.checks import not_a_server_error

from tests.conftest import png, server_settings

pytestmark = [
    # Generated files include the IM format, which Pillow 13 deprecates, and
    # corrupt TIFF tags, which Pillow warns about before skipping them.
    pytest.mark.filterwarnings("ignore:IM image format is deprecated"),
    pytest.mark.filterwarnings("ignore::UserWarning:PIL"),
]

FUZZ_SETTINGS = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

MODES = [
    "1",
    "L",
    "LA",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "RGBX",
    "RGBa",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "I",
    "I;16",
    "I;16B",
    "I;16L",
    "F",
]
# Formats that Pillow 13 both writes and reads. The server accepts any format
# Pillow reads, not only the PNG and JPEG that its API documents.
FORMATS = [
    "PNG",
    "JPEG",
    "GIF",
    "BMP",
    "TIFF",
    "WEBP",
    "PPM",
    "ICO",
    "ICNS",
    "TGA",
    "PCX",
    "SGI",
    "IM",
    "DDS",
    "QOI",
    "JPEG2000",
    "SPIDER",
    "XBM",
    "MSP",
    "BLP",
]
# ICO rejects sides over 256 pixels, and ICNS is slow to save large images
# (up to 1 s at 640 pixels, measured on 2 cores).
SMALL_ONLY_FORMATS = {"ICO", "ICNS"}
# Above the 512-pixel side at which preprocess.downscale shrinks the image.
LARGE_SIDES = st.integers(513, 640)
SMALL_SIDES = st.integers(1, 64)

# Files that Pillow identifies by their first bytes and then rejects while
# parsing the header. Each is a fuzzed failure, reduced by hand.
MALFORMED_HEADERS = {
    # A PNG cut inside its IHDR chunk, as an interrupted upload leaves it.
    "png-truncated": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "ppm-size": b"P5 2x 2 255 \x00\x00\x00\x00",
    "ppm-maxval": b"P5\n2 2\n0\n\x00\x00\x00\x00",
    # A 2x2 8-bit BMP whose BITMAPINFOHEADER names compression type 99.
    "bmp-compression": b"BM"
    + bytes(12)
    + (40).to_bytes(4, "little")
    + (2).to_bytes(4, "little") * 2
    + (1).to_bytes(2, "little")
    + (8).to_bytes(2, "little")
    + (99).to_bytes(4, "little")
    + bytes(20),
}


def blp_with_compression(compression: int) -> bytes:
    """Return a valid 2x2 BLP2 file whose compression field is overwritten."""
    buffer = io.BytesIO()
    Image.new("P", (2, 2)).save(buffer, format="BLP")
    data = bytearray(buffer.getvalue())
    data[4:8] = compression.to_bytes(4, "little")
    return bytes(data)


def can_encode(mode: str, image_format: str) -> bool:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "IM image format is deprecated")
        try:
            Image.new(mode, (8, 8)).save(io.BytesIO(), format=image_format)
        except (OSError, ValueError, KeyError):
            return False
    return True


ENCODINGS = [(m, f) for m in MODES for f in FORMATS if can_encode(m, f)]


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    # Pillow converts to the premultiplied-alpha mode RGBa only from RGBA.
    if mode == "RGBa":
        image = image.convert("RGBA")
    return image.convert(mode)


@st.composite
def pillow_images(draw: st.DrawFn) -> tuple[Image.Image, str]:
    """Draw an image in an encodable mode, filled with noise or 0-3 strokes."""
    mode, image_format = draw(st.sampled_from(ENCODINGS))
    if image_format in SMALL_ONLY_FORMATS:
        sides = SMALL_SIDES
    else:
        # About one side in three is large enough for preprocess.downscale.
        sides = st.one_of(SMALL_SIDES, SMALL_SIDES, LARGE_SIDES)
    size = (draw(sides), draw(sides))
    content = draw(st.sampled_from(["noise", "strokes"]))

    if content == "noise":
        # Random raw bytes in the mode's layout, which include NaN and
        # infinity for mode F.
        seed = draw(st.integers(0, 2**32 - 1))
        length = len(Image.new(mode, size).tobytes())
        pixels = np.random.default_rng(seed).bytes(length)
        return Image.frombytes(mode, size, pixels), image_format

    paper = draw(st.integers(0, 255))
    image = Image.new("L", size, paper)
    pen = ImageDraw.Draw(image)
    for _ in range(draw(st.integers(0, 3))):
        points = [
            (draw(st.integers(0, size[0] - 1)), draw(st.integers(0, size[1] - 1)))
            for _ in range(2)
        ]
        pen.line(points, fill=draw(st.integers(0, 255)), width=draw(st.integers(1, 4)))
    return to_mode(image, mode), image_format


def encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


@st.composite
def encoded_images(draw: st.DrawFn) -> bytes:
    return encode(*draw(pillow_images()))


@st.composite
def corrupted_images(draw: st.DrawFn) -> bytes:
    """Draw an encoded image, then truncate it or overwrite header bytes."""
    data = bytearray(draw(encoded_images()))
    if draw(st.booleans()):
        return bytes(data[: draw(st.integers(0, len(data) - 1))])

    for _ in range(draw(st.integers(1, 4))):
        # PNG, BMP, GIF, PPM and BLP keep size, depth and compression in
        # their first 64 bytes.
        position = draw(st.integers(0, min(len(data), 64) - 1))
        data[position] = draw(st.integers(0, 255))
    return bytes(data)


def check_preprocess_contract(data: bytes) -> None:
    """Check that preprocess returns a 28x28 uint8 digit or raises InvalidImageError."""
    try:
        digit = preprocess(data)
    except InvalidImageError:
        return

    assert digit.shape == (28, 28)
    assert digit.dtype == np.uint8


def resident_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    # The kernel reports VmRSS in kB.
    return int(line.split()[1]) * 1024


@pytest.fixture
def client(s3):
    app = create_app(server_settings(), s3=s3, announce=False)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def api_schema(s3):
    # schemathesis runs the app's lifespan, which downloads the model from
    # moto's S3, when it fetches the OpenAPI document.
    app = create_app(server_settings(), s3=s3, announce=False)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


api = schemathesis.pytest.from_fixture("api_schema").include(
    path=["/health", "/predict", "/predict/batch"]
)


@api.parametrize()
@FUZZ_SETTINGS
def test_api_fuzz_no_server_errors(case):
    case.call_and_validate(checks=[not_a_server_error])


@FUZZ_SETTINGS
@given(st.binary(max_size=4096))
def test_preprocess_arbitrary_bytes(data):
    check_preprocess_contract(data)


@settings(FUZZ_SETTINGS, max_examples=200)
@given(encoded_images())
def test_preprocess_valid_images(data):
    check_preprocess_contract(data)


@settings(FUZZ_SETTINGS, max_examples=300)
@given(corrupted_images())
def test_preprocess_corrupted_images(data):
    check_preprocess_contract(data)


@pytest.mark.parametrize(
    "data",
    [
        *(pytest.param(data, id=name) for name, data in MALFORMED_HEADERS.items()),
        pytest.param(blp_with_compression(44), id="blp-compression"),
    ],
)
def test_preprocess_malformed_header_rejected(data):
    with pytest.raises(InvalidImageError):
        preprocess(data)


def test_predict_truncated_png_gets_400(client):
    data = MALFORMED_HEADERS["png-truncated"]

    response = client.post("/predict", files={"file": ("d.png", data)})

    assert response.status_code == 400


@pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads VmRSS from Linux /proc"
)
def test_predict_memory_stays_flat(client, mnist):
    bodies = [png(digit) for digit in mnist.x_test[:2000]]
    statuses = set()

    def predict(body: bytes) -> None:
        response = client.post("/predict", files={"file": ("d.png", body)})
        statuses.add(response.status_code)

    # Allocator pools, caches and lazy imports grow during the first requests.
    for body in bodies[:200]:
        predict(body)
    gc.collect()
    after_warm_up = resident_bytes()
    for body in bodies[200:]:
        predict(body)
    gc.collect()
    growth = resident_bytes() - after_warm_up

    assert statuses == {200}
    assert growth < 50 * 2**20, f"resident memory grew {growth / 2**20:.1f} MiB"
