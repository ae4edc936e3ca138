"""Turning arbitrary images into MNIST form: 28x28 uint8 grayscale, white digit on black.

The rule (also in docs/serving.md):
1. transparent pixels are composited onto white (a digit drawn on a transparent canvas is dark-on-light);
2. convert to grayscale ("L");
3. if the mean of the one-pixel border is above 127 the background is light, so the image is inverted;
4. pad to a square with black (keeps the aspect ratio) and resize to 28x28 with a box filter.
No centring by mass as in the original MNIST preprocessing: send digits roughly centred.
"""

import io

import numpy as np
from PIL import Image, ImageOps

from serving.contract import IMAGE_SIDE


class ImageError(ValueError):
    """The bytes are not an image we accept (message says why)."""


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Encoded bytes (any format Pillow reads) -> uint8 [28, 28] in MNIST form.

    The header's declared size is checked against max_pixels before any pixel is decoded, so a small
    file declaring a huge image (a decompression bomb) costs nothing.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large to decode: {e}") from e
    except Exception as e:  # Pillow raises many types for garbage: UnidentifiedImageError, SyntaxError...
        raise ImageError(f"cannot identify image bytes ({len(data)} bytes): send PNG, JPEG, BMP, ...") from e
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"image declares {width}x{height} = {width * height} pixels, above the limit of {max_pixels}"
        )
    try:
        image.load()
        return to_mnist(image)
    except Exception as e:
        raise ImageError(f"cannot decode {image.format} image {width}x{height}: {e}") from e


def to_mnist(image: Image.Image) -> np.ndarray:
    """A PIL image of any mode and size -> uint8 [28, 28] in MNIST form (see module docstring)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    gray = image.convert("L")
    pixels = np.asarray(gray)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if border.mean() > 127:
        gray = ImageOps.invert(gray)
    if gray.size != (IMAGE_SIDE, IMAGE_SIDE):
        side = max(gray.size)
        square = Image.new("L", (side, side), 0)
        square.paste(gray, ((side - gray.width) // 2, (side - gray.height) // 2))
        gray = square.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BOX)
    return np.asarray(gray, dtype=np.uint8)
