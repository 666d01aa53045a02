"""Turn a user's picture into an MNIST-style 28x28 digit.

MNIST digits are light ink on a dark background, scaled so the longest side
of the ink fits 20 pixels, and placed in a 28x28 field with the ink's centre
of mass at the centre. Users send dark ink on light paper, of any size,
off-centre, in colour or with transparency, so `to_mnist` repeats those
steps on every upload. An MNIST digit itself passes through with its ink
box and centre of mass unchanged, up to resampling.
"""

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MNIST_SIZE = 28
MNIST_BOX = 20
# Pixel-count limit, checked from the header before any pixel is decoded.
MAX_PIXELS = 25_000_000
# Larger images are shrunk to this longest side before any float work.
MAX_WORKING_SIDE = 512
# Pixels above this level (of 255, after stretching the brightest ink to
# 255) count as ink when finding the digit's box. Low, so that an MNIST
# digit's faint anti-aliased edge stays inside its box.
INK_LEVEL = 5

# PIL warns above 89,478,485 pixels and raises above twice that (Pillow 13).
# MAX_PIXELS is stricter and checked right after the header is read, so the
# warning only adds noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


# Formats users send photos and drawings in. Pillow reads many more, but its
# rarer plugins decode a whole file while opening it (ICO), before the pixel
# limit can be checked, or need outside programs (EPS needs Ghostscript).
# Pillow's JPEG reader also opens MPO, the JPEG variant some cameras write.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
# libjpeg decodes every scan of a progressive JPEG over the whole image, so a
# 5 MB file that repeats one scan 120,000 times took 10 s to decode. libjpeg's
# progressive encoder writes 10 scans for a colour image, and the margin
# covers embedded thumbnails.
MAX_JPEG_SCANS = 100
# TIFF tile tags
_TILE_WIDTH, _TILE_LENGTH = 322, 323


class InvalidImageError(ValueError):
    """The upload is not an image this server can read as a digit."""


def open_image(data: bytes) -> Image.Image:
    """Read an upload's header and check its pixel count; decode no pixel yet."""
    if not data:
        raise InvalidImageError("The uploaded file is empty; send a PNG or JPEG image.")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(
            f"The image has more pixels than the limit of {MAX_PIXELS}; "
            "scale it down before sending."
        ) from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(
            "The uploaded file is not an image format this server reads "
            f"({', '.join(FORMATS)}); send a PNG or JPEG image."
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:
        # A recognised format whose header is cut off or malformed. Pillow's
        # plugins raise many exception types on malformed files (TypeError
        # and AttributeError among them), and none of them is the server's
        # fault.
        raise InvalidImageError(
            f"The image header could not be read ({exc}); the file is truncated "
            "or corrupt."
        ) from exc

    width, height = image.size
    if width * height > MAX_PIXELS:
        raise InvalidImageError(
            f"The image is {width}x{height} pixels, more than the limit of "
            f"{MAX_PIXELS} pixels; scale it down before sending."
        )
    check_decoding_cost(image, data)

    return image


def check_decoding_cost(image: Image.Image, data: bytes) -> None:
    """Reject files whose decoding costs far more than their pixel count suggests."""
    if image.format == "JPEG":
        # Entropy-coded data escapes every 0xFF byte, so this counts the scans
        # of the image and of any embedded thumbnail.
        scans = data.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise InvalidImageError(
                f"The JPEG has {scans} scans, more than the limit of "
                f"{MAX_JPEG_SCANS}; save it again as a baseline JPEG or a PNG."
            )
    if image.format == "TIFF":
        # Pillow allocates and decodes whole tiles, and a tile may be declared
        # far larger than the image.
        tile_width = image.tag_v2.get(_TILE_WIDTH, 0)
        tile_length = image.tag_v2.get(_TILE_LENGTH, 0)
        if tile_width * tile_length > MAX_PIXELS:
            raise InvalidImageError(
                f"The TIFF's tiles are {tile_width}x{tile_length} pixels, more than "
                f"the limit of {MAX_PIXELS}; save it as a PNG or an untiled TIFF."
            )


def load_image(image: Image.Image) -> Image.Image:
    """Decode the pixels of an image from `open_image`, upright per its EXIF."""
    try:
        # In place, because without an orientation tag the default returns a
        # copy of the image.
        ImageOps.exif_transpose(image, in_place=True)
        image.load()
    except MemoryError:
        raise
    except Exception as exc:
        # As in open_image: a malformed file, whatever Pillow raised for it.
        raise InvalidImageError(
            f"The image could not be decoded ({exc}); it may be truncated or corrupt."
        ) from exc

    return image


def to_rgba(image: Image.Image) -> Image.Image:
    """Convert an image to RGBA, or raise InvalidImageError for a mode Pillow cannot."""
    try:
        return image.convert("RGBA")
    except ValueError as exc:
        # For example "La", greyscale with premultiplied alpha, from a TIFF.
        raise InvalidImageError(
            f"The image's pixel mode {image.mode} cannot be read ({exc}); save it "
            "as an RGB, RGBA or greyscale PNG or JPEG."
        ) from exc


def downscale(image: Image.Image) -> Image.Image:
    """Shrink an image so its longest side is at most `MAX_WORKING_SIDE`.

    Keeps the aspect ratio. A digit needs far fewer pixels than a photo
    has, and the float arrays of a full 25-megapixel image would take
    gigabytes.
    """
    if max(image.size) <= MAX_WORKING_SIDE:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L"):
        # Pillow's reduce rejects 16-bit modes when the two axes shrink by
        # different factors; mode I stores the same values.
        image = image.convert("I")
    elif image.mode not in ("L", "RGB", "RGBA", "I", "F"):
        image = to_rgba(image)
    else:
        image = image.copy()
    image.thumbnail((MAX_WORKING_SIDE, MAX_WORKING_SIDE), Image.Resampling.BOX)

    return image


def to_luminance(image: Image.Image) -> np.ndarray:
    """Return the image as float32 luminance 0-255, transparency composited."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
        # 16-bit PNGs decode to mode I or I;16 with values up to 65535.
        scale = 255.0 / 65535.0 if pixels.max(initial=0) > 255 else 1.0
        return np.clip(pixels * scale, 0, 255)

    if image.mode == "L":
        return np.asarray(image, dtype=np.float32)

    rgba = np.asarray(to_rgba(image), dtype=np.float32)
    luminance = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    alpha = rgba[..., 3] / 255.0
    if alpha.min() == 1.0:
        return luminance

    # Composite onto paper that contrasts with the ink: light paper under
    # dark strokes, dark paper under light strokes.
    opaque = alpha > 0.5
    ink_is_dark = opaque.any() and luminance[opaque].mean() < 128
    paper = 255.0 if ink_is_dark or not opaque.any() else 0.0

    return luminance * alpha + paper * (1.0 - alpha)


def _median(values: np.ndarray) -> float:
    # np.median's general path costs more than the rest of a 28x28 image's
    # preprocessing; a partition of this small array gives the same value.
    middle = len(values) // 2
    ordered = np.partition(values, [middle - 1, middle] if len(values) > 1 else [0])
    if len(values) % 2:
        return float(ordered[middle])

    return float(ordered[middle - 1] + ordered[middle]) / 2


def _border_pixels(pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])


def remove_paper(pixels: np.ndarray, border: np.ndarray) -> np.ndarray:
    """Return light ink on a zero background, whatever the paper's colour.

    ``border`` contains the image's edge pixels, which are mostly paper.
    """
    # Light paper: invert so that ink is bright, as in MNIST.
    if _median(border) > 127:
        pixels = 255.0 - pixels
        border = 255.0 - border

    # Remove the paper's level and its noise: the border's median and three
    # median absolute deviations, which ink touching the border barely moves.
    # NOTE: a crop so tight that ink covers most of the border (a thin "1"
    # cut at its ink box) reads as blank. Cropped that way, 37 of the 1,135
    # "1"s in the MNIST test set did.
    paper = _median(border)
    noise = 3 * _median(np.abs(border - paper))
    pixels = np.clip(pixels - paper, 0, None)
    pixels[pixels <= noise] = 0

    return pixels


def to_mnist(image: Image.Image) -> np.ndarray:
    """Return a 28x28 uint8 MNIST-style digit: light ink on black, centred.

    Raises
    ------
    InvalidImageError
        When the image contains no ink at all.
    """
    pixels = to_luminance(downscale(image))

    # A border of zeros leaves nothing to invert or remove, so the work is
    # skipped. 9,893 of MNIST's 10,000 test digits have such a border.
    border = _border_pixels(pixels)
    if border.any():
        pixels = remove_paper(pixels, border)

    peak = pixels.max(initial=0)
    if peak <= 0:
        raise InvalidImageError("The image is blank; send a picture of one digit.")
    if peak != 255.0:
        # Divided first: 255 / peak overflows float32 when a float image's
        # brightest pixel is tiny.
        pixels = pixels / peak * 255.0

    ink_mask = pixels > INK_LEVEL
    rows = np.flatnonzero(ink_mask.any(axis=1))
    cols = np.flatnonzero(ink_mask.any(axis=0))
    ink = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    # Fit the longest side into 20 pixels, keeping the aspect ratio. A box
    # that already fits (an MNIST digit) is not resampled.
    height, width = ink.shape
    scale = MNIST_BOX / max(height, width)
    if scale == 1.0:
        box_pixels = ink
    else:
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        box = Image.fromarray(ink.astype(np.float32), mode="F").resize(
            new_size, Image.Resampling.LANCZOS
        )
        box_pixels = np.clip(np.asarray(box, dtype=np.float64), 0, 255)

    # Place the box so that its centre of mass lands on pixel (14, 14), where
    # MNIST's digits have theirs (mean 13.99 and 14.00 over its test set).
    total = box_pixels.sum()
    row_mass = (box_pixels.sum(axis=1) * np.arange(box_pixels.shape[0])).sum() / total
    col_mass = (box_pixels.sum(axis=0) * np.arange(box_pixels.shape[1])).sum() / total
    top = round(MNIST_SIZE / 2 - row_mass)
    left = round(MNIST_SIZE / 2 - col_mass)
    top = min(max(top, 0), MNIST_SIZE - box_pixels.shape[0])
    left = min(max(left, 0), MNIST_SIZE - box_pixels.shape[1])

    field = np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float64)
    field[top : top + box_pixels.shape[0], left : left + box_pixels.shape[1]] = (
        box_pixels
    )

    return np.round(field).astype(np.uint8)


def read_digit(image: Image.Image) -> np.ndarray:
    """Decode an image from `open_image` into a 28x28 uint8 MNIST-style digit."""
    return to_mnist(load_image(image))


def preprocess(data: bytes) -> np.ndarray:
    """Decode an uploaded image file into a 28x28 uint8 MNIST-style digit."""
    return read_digit(open_image(data))
