"""decode_image on hostile bytes: every Pillow failure is an InvalidRequestError naming the field, only the PNG and
JPEG parsers run, and PNG metadata is bounded (issue 17, finding 2)."""

from __future__ import annotations

import contextlib
import io
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from prunefusion.errors import InvalidRequestError
from prunefusion.images import MAX_PNG_METADATA_CHUNKS, decode_image


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(side: int = 32, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (side, side), (90, 90, 90) if mode == "RGB" else 90).save(buffer, format="PNG")
    return buffer.getvalue()


def with_chunks(chunks: list[bytes], before_pixels: bool = True) -> bytes:
    """A valid 32x32 PNG with `chunks` inserted after IHDR (read by Image.open) or before IEND (read by load)."""
    data = png()
    at = len(b"\x89PNG\r\n\x1a\n") + 25 if before_pixels else data.rindex(b"IEND") - 4
    return data[:at] + b"".join(chunks) + data[at:]


INFLATES_TO_2_MIB = zlib.compress(b"\0" * (2 << 20), 9)  # 2 KiB that Pillow would inflate past its 1 MiB cap
ONE_MIB_OF_TEXT = zlib.compress(b"\0" * ((1 << 20) - 16), 9)

HOSTILE = {
    "zTXt inflating past the cap": with_chunks([chunk(b"zTXt", b"k\0\0" + INFLATES_TO_2_MIB)]),
    "zTXt past the cap after the pixels": with_chunks([chunk(b"zTXt", b"k\0\0" + INFLATES_TO_2_MIB)], False),
    "iTXt inflating past the cap": with_chunks([chunk(b"iTXt", b"k\0\1\0\0\0" + INFLATES_TO_2_MIB)]),
    "iCCP inflating past the cap": with_chunks([chunk(b"iCCP", b"profile\0\0" + INFLATES_TO_2_MIB)]),
    "70 zTXt of 1 MiB each": with_chunks([chunk(b"zTXt", b"k\0\0" + ONE_MIB_OF_TEXT)] * 70),
    "many small tEXt after the pixels": with_chunks([chunk(b"tEXt", b"k\0v")] * 100, False),
    "SGI magic": b"\x01\xda" + random.Random(1).randbytes(600),
    "FTEX magic": b"FTEX" + random.Random(2).randbytes(600),
    "XV thumbnail magic": b"P7 332\n" + random.Random(3).randbytes(600),
    "truncated PNG": png()[:60],
    "PNG signature only": b"\x89PNG\r\n\x1a\n",
    "PNG with a bad CRC": png()[:29] + b"\0\0\0\0" + png()[33:],
    "random bytes": random.Random(4).randbytes(2000),
    "truncated JPEG": None,
}


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()[:200]


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_bytes_are_invalid_requests_naming_the_field(name):
    data = HOSTILE[name] if HOSTILE[name] is not None else truncated_jpeg()
    with pytest.raises(InvalidRequestError) as err:
        decode_image(data, 32, 128, field="image")
    assert err.value.field == "image"


@pytest.mark.parametrize(("data", "needle"), [
    (with_chunks([chunk(b"zTXt", b"k\0\0" + INFLATES_TO_2_MIB)]), "inflates past 1 MiB"),
    (with_chunks([chunk(b"iCCP", b"profile\0\0" + INFLATES_TO_2_MIB)]), "inflates past 1 MiB"),
    (with_chunks([chunk(b"zTXt", b"k\0\0" + ONE_MIB_OF_TEXT)] * (MAX_PNG_METADATA_CHUNKS + 1)),
     f"more than {MAX_PNG_METADATA_CHUNKS} text or ICC"),
    (b"\x01\xda" + bytes(600), "not a PNG or JPEG"),  # SGI's parser is never tried
])
def test_metadata_limits_and_other_formats_say_what_is_wrong(data, needle):
    with pytest.raises(InvalidRequestError, match=needle):
        decode_image(data, 32, 128)


def test_images_within_the_limits_still_decode():
    text = [chunk(b"zTXt", b"k\0\0" + ONE_MIB_OF_TEXT)] * MAX_PNG_METADATA_CHUNKS  # 16 MiB of text: at the bound
    pixels = decode_image(with_chunks(text), 32, 128)
    assert pixels.shape == (32, 32, 3) and (pixels == 90).all()
    assert decode_image(png(64, "P"), 32, 128).shape == (32, 32, 3)


def test_mutated_pngs_and_jpegs_decode_or_are_invalid_requests():
    """Random byte flips, cuts and insertions of valid images: nothing but InvalidRequestError escapes."""
    rng = random.Random(0)
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    seeds = []
    for fmt, mode, options in [("PNG", "RGB", {}), ("PNG", "P", {}), ("JPEG", "RGB", {"progressive": True})]:
        buffer = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buffer, format=fmt, **options)
        seeds.append(buffer.getvalue())
    for _ in range(600):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(data))
            op = rng.random()
            if op < 0.6:
                data[at] = rng.randrange(256)
            elif op < 0.8:
                del data[max(at, 1):]
            else:
                data[at:at] = rng.randbytes(rng.randint(1, 16))
        with contextlib.suppress(InvalidRequestError):
            decode_image(bytes(data), 32, 128)
