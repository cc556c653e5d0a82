"""Image bytes in and out: validation with reasons, PNG encoding, resizing (pure functions; Pillow and numpy only,
shared by the server and the offline commands)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

from prunefusion.errors import InvalidRequestError

ACCEPTED_FORMATS = ("PNG", "JPEG")  # the only parsers tried: Pillow's other ~40 (SGI, FTEX, XV, ...) never see a byte
CONVERTIBLE_MODES = {"RGB", "RGBA", "L", "LA", "P"}  # converted to RGB (alpha composited on black)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_METADATA_CHUNKS = {b"tEXt", b"zTXt", b"iTXt", b"iCCP"}  # the chunks Pillow inflates or keeps while reading
# Pillow inflates each text/ICC chunk up to PngImagePlugin.MAX_TEXT_CHUNK (1 MiB; past it: ValueError) and all of
# them up to MAX_TEXT_MEMORY (64 MiB). Real images carry a handful (software, date, one profile); 16 of them bound an
# image's metadata at 16 MiB without changing Pillow's process-wide settings.
MAX_PNG_METADATA_CHUNKS = 16


def _pillow_failures() -> tuple[type[BaseException], ...]:
    """What Pillow's PNG/JPEG parsers raise on hostile bytes: truncation (OSError, EOFError), bad chunks
    (SyntaxError, struct.error, zlib.error), limits (ValueError, DecompressionBombError), and indexing past short
    buffers."""
    from PIL import Image

    return (OSError, EOFError, SyntaxError, ValueError, IndexError, TypeError, KeyError, struct.error, zlib.error,
            Image.DecompressionBombError)


def _pillow_reason(err: BaseException) -> str:
    text = str(err)
    if "MAX_TEXT_CHUNK" in text:
        return "a text or ICC profile chunk inflates past 1 MiB"
    if "MAX_TEXT_MEMORY" in text:
        return "its text chunks inflate past 64 MiB in all"
    return f"{err.__class__.__name__}: {text}" if text else err.__class__.__name__


def _check_png_metadata(data: bytes, field: str) -> None:
    """Count the PNG's text/ICC chunks by walking the chunk table (lengths and types only, nothing inflated);
    a malformed table is left to Pillow, which reports it."""
    count, pos = 0, len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind in PNG_METADATA_CHUNKS:
            count += 1
            if count > MAX_PNG_METADATA_CHUNKS:
                raise InvalidRequestError(field, f"has more than {MAX_PNG_METADATA_CHUNKS} text or ICC profile "
                                          "chunks")
        if kind == b"IEND":
            return
        pos += 12 + length  # length, type, body, CRC


def decode_image(data: bytes, native: int, max_size: int, field: str = "image") -> np.ndarray:
    """PNG/JPEG bytes -> uint8 [native, native, 3]. Square images from `native` to `max_size` pixels are reduced
    by area averaging; anything else, including bytes Pillow fails on in any way, raises InvalidRequestError naming
    what is wrong. Memory is bounded before any pixel is decoded: the size is checked from the header (at most
    max_size**2 RGBA pixels, 64 MiB at the 4096 px cap) and PNG metadata by _check_png_metadata."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidRequestError(field, "is empty")
    if data.startswith(PNG_SIGNATURE):
        _check_png_metadata(data, field)
    try:
        # reads the header only (and PNG chunks before the pixels): the size is checked before decoding
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError:
        raise InvalidRequestError(field, f"is too large: at most {max_size}x{max_size}") from None
    except UnidentifiedImageError:
        raise InvalidRequestError(field, "is not a PNG or JPEG image") from None
    except _pillow_failures() as err:
        raise InvalidRequestError(field, f"is not a valid PNG or JPEG image ({_pillow_reason(err)})") from None
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
        return _to_rgb(image, native)
    except _pillow_failures() as err:
        raise InvalidRequestError(field, f"could not be decoded ({_pillow_reason(err)})") from None


def _to_rgb(image, native: int) -> np.ndarray:
    from PIL import Image

    image.load()
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba)
    image = image.convert("RGB")
    if image.width != native:
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
