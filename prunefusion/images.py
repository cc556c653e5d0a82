"""Image bytes in and out: validation with reasons, PNG encoding, resizing (pure functions; Pillow and numpy only,
shared by the server and the offline commands)."""

from __future__ import annotations

import io

import numpy as np

from prunefusion.errors import InvalidRequestError

ACCEPTED_FORMATS = ("PNG", "JPEG")
CONVERTIBLE_MODES = {"RGB", "RGBA", "L", "LA", "P"}  # converted to RGB (alpha composited on black)


def decode_image(data: bytes, native: int, max_size: int, field: str = "image") -> np.ndarray:
    """PNG/JPEG bytes -> uint8 [native, native, 3]. Square images from `native` to `max_size` pixels are reduced
    by area averaging; anything else raises InvalidRequestError naming what is wrong."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidRequestError(field, "is empty")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only: the size is checked before decoding
    except Image.DecompressionBombError:
        raise InvalidRequestError(field, f"is too large: at most {max_size}x{max_size}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise InvalidRequestError(field, f"is not a PNG or JPEG image ({err.__class__.__name__})") from None
    if image.format not in ACCEPTED_FORMATS:
        raise InvalidRequestError(field, f"format {image.format} is not accepted; send PNG or JPEG")
    width, height = image.size
    if width != height:
        raise InvalidRequestError(field, f"must be square; got {width}x{height}")
    if width > max_size:
        raise InvalidRequestError(field, f"is too large: {width}x{height}, at most {max_size}x{max_size}")
    if width < native:
        raise InvalidRequestError(field, f"is too small: {width}x{height}, at least {native}x{native}")
    if image.mode not in CONVERTIBLE_MODES:
        raise InvalidRequestError(field, f"mode {image.mode} is not supported; send RGB, RGBA, L or P")
    try:
        image.load()
    except (OSError, ValueError) as err:
        raise InvalidRequestError(field, f"could not be decoded ({err})") from None
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba)
    image = image.convert("RGB")
    if width != native:
        image = image.resize((native, native), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)


def encode_png(pixels: np.ndarray, size: int | None = None) -> tuple[bytes, int, int]:
    """uint8 [H, W, 3] -> (PNG bytes, width, height), enlarged to size x size with nearest neighbour if asked."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    if size is not None and size != image.width:
        image = image.resize((size, size), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), image.width, image.height


def check_output_size(size: int | None, native: int, max_size: int) -> int:
    if size is None or size == 0:
        return native
    if size < native or size > max_size or size % native:
        raise InvalidRequestError("size", f"must be a multiple of the native size {native} up to {max_size}; "
                                  f"got {size}")
    return size
