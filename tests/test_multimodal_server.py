"""The Multimodal gRPC service end to end: a pico Transfusion model (random weights) behind a real server."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from PIL import Image
from test_hostile_images import HOSTILE

from prunefusion.transfusion import shapes
from prunefusion.transfusion.sampling import ImageRequest, TransfusionSampler
from prunefusion_client import Client, ImageOptions
from prunefusion_client.cli import main as client_main


@pytest.fixture()
def mm_client(mm_server):
    with Client(mm_server.target, timeout=60, max_attempts=1) as c:
        yield c


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def huge_png_header(side: int = 20000) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_generate_image_is_reproducible_and_sized(mm_client, transfusion_dir):
    options = ImageOptions(steps=3, guidance_scale=2.0, seed=11)
    a = mm_client.generate_image("a red circle on the left", options=options)
    b = mm_client.generate_image("a red circle on the left", options=options)
    assert (a.width, a.height, a.steps, a.seed, a.model) == (32, 32, 3, 11, "pico-tf")
    assert a.png == b.png
    # the server's image is the sampler's image for the same request
    sampler = TransfusionSampler.load(transfusion_dir)
    expected = sampler.generate_images([ImageRequest("a red circle on the left", 3, 2.0, 11)])[0]
    assert np.abs(png_pixels(a.png).astype(int) - expected).max() <= 1
    big = mm_client.generate_image("a red circle on the left", options=ImageOptions(steps=3, seed=11, size=96))
    assert png_pixels(big.png).shape == (96, 96, 3)


def test_concurrent_requests_are_batched_and_keep_their_seeds(mm_client, transfusion_dir):
    prompts = ["a red circle on the left", "a blue square in the center", "a green triangle at the top",
               "a cyan circle at the bottom right"]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda i: mm_client.generate_image(
            prompts[i], options=ImageOptions(steps=3, guidance_scale=3.0, seed=100 + i)), range(4)))
    assert max(r.timings.batch_size for r in responses) >= 2, [r.timings.batch_size for r in responses]
    sampler = TransfusionSampler.load(transfusion_dir)
    for i, response in enumerate(responses):
        alone = sampler.generate_images([ImageRequest(prompts[i], 3, 3.0, 100 + i)])[0]
        assert np.abs(png_pixels(response.png).astype(int) - alone).max() <= 1, i


def test_caption_accepts_png_and_jpeg_and_large_multiples(mm_client):
    pixels = shapes.render(shapes.Scene("square", "red", "center"))
    image = Image.fromarray(pixels)
    text = mm_client.caption(encoded(image)).text
    assert isinstance(text, str)
    assert mm_client.caption(encoded(image.resize((96, 96), Image.Resampling.NEAREST))).text == text
    mm_client.caption(encoded(image, "JPEG"))
    mm_client.caption(encoded(image.convert("L")))  # grayscale is converted
    limited = mm_client.caption(encoded(image), max_tokens=1).text
    assert len(limited.split()) <= 1


def test_concurrent_captions_share_a_batch_and_match_their_single_captions(mm_client):
    renders = [encoded(Image.fromarray(shapes.render(s))) for s in shapes.all_scenes()[:4]]
    alone = [mm_client.caption(png).text for png in renders]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(mm_client.caption, renders))
    assert max(r.timings.batch_size for r in together) >= 2
    assert [r.text for r in together] == alone


@pytest.mark.parametrize(("data", "needle"), [
    (b"not an image at all", "not a PNG or JPEG"),
    (encoded(Image.new("RGB", (256, 256))), "too large"),
    (encoded(Image.new("RGB", (32, 48))), "square"),
    (encoded(Image.new("RGB", (16, 16))), "too small"),
    (encoded(Image.new("CMYK", (32, 32)), "JPEG"), "mode CMYK"),
    (encoded(Image.new("I;16", (32, 32))), "mode I;16"),
    (encoded(Image.new("RGB", (32, 32)), "BMP"), "not a PNG or JPEG"),  # only the PNG and JPEG parsers are tried
    (HOSTILE["SGI magic"], "not a PNG or JPEG"),
    (HOSTILE["zTXt inflating past the cap"], "inflates past 1 MiB"),
    (HOSTILE["iCCP inflating past the cap"], "inflates past 1 MiB"),
    (HOSTILE["70 zTXt of 1 MiB each"], "text or ICC profile chunks"),
    (HOSTILE["truncated PNG"], "truncated"),
    (b"", "empty"),
    (None, "too large"),  # a PNG header claiming 20000x20000: PIL's decompression-bomb guard, before any decoding
])
def test_bad_images_are_invalid_argument(mm_client, data, needle):
    data = huge_png_header() if data is None else data
    with pytest.raises(grpc.RpcError) as err:
        mm_client.caption(data)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()


@pytest.mark.parametrize(("prompt", "options", "needle"), [
    ("a red hexagon", ImageOptions(), "hexagon"),
    ("", ImageOptions(), "prompt"),
    ("a red circle", ImageOptions(steps=0), "steps"),
    ("a red circle", ImageOptions(steps=51), "steps"),
    ("a red circle", ImageOptions(guidance_scale=-1), "guidance_scale"),
    ("a red circle", ImageOptions(size=40), "size"),
    ("a red circle", ImageOptions(size=256), "size"),
])
def test_bad_image_requests_are_invalid_argument(mm_client, prompt, options, needle):
    with pytest.raises(grpc.RpcError) as err:
        mm_client.generate_image(prompt, options=options)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()


def test_models_are_routed_to_their_own_service(mm_client):
    with pytest.raises(grpc.RpcError) as err:
        mm_client.generate_image("a red circle", "pico-lm")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "TextGeneration" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        mm_client.generate("hello", "pico-tf")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "Multimodal" in err.value.details()
    assert [m.name for m in mm_client.list_models()] == ["pico-lm"]
    (info,) = mm_client.list_image_models()
    assert (info.name, info.image_size, info.max_steps, info.max_batch_size) == ("pico-tf", 32, 50, 4)


def test_a_request_past_its_deadline_is_dropped_before_its_batch_runs(mm_client):
    import time

    def expiring():
        with pytest.raises(grpc.RpcError) as err:
            mm_client.generate_image("a red circle", options=ImageOptions(steps=3), timeout=0.05)  # < batch window
        return err.value.code()

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(expiring)
        time.sleep(0.1)  # inside the first request's 300 ms batch window, after its deadline
        second = pool.submit(mm_client.generate_image, "a blue circle", options=ImageOptions(steps=3, seed=1))
        assert first.result() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert second.result().timings.batch_size == 1  # the expired request did not take a batch slot


def test_interleaved_streams_text_and_image_parts(mm_client):
    parts = list(mm_client.generate_interleaved("a red circle", options=ImageOptions(steps=2, seed=1),
                                                max_tokens=6, max_images=1))
    assert 1 <= len(parts) <= 7
    for part in parts:
        assert part.WhichOneof("part") in ("text", "image")
        if part.WhichOneof("part") == "image":
            assert png_pixels(part.image.png).shape == (32, 32, 3)


def test_client_cli_image_and_caption(mm_server, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert client_main(["--target", mm_server.target, "image", "a red circle on the left", "-o", str(out),
                        "--steps", "2", "--seed", "3"]) == 0
    assert png_pixels(out.read_bytes()).shape == (32, 32, 3)
    assert client_main(["--target", mm_server.target, "caption", str(out)]) == 0
    assert client_main(["--target", mm_server.target, "image", "a red blob", "-o", str(tmp_path / "x.png")]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    # a missing file and a seed the API cannot carry (uint64) are plain errors, not tracebacks
    assert client_main(["--target", mm_server.target, "caption", str(tmp_path / "missing.png")]) == 2
    assert client_main(["--target", mm_server.target, "image", "a red circle", "--seed", "-1"]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_client_cli_models_lists_text_and_image_models(mm_server, capsys):
    assert client_main(["--target", mm_server.target, "--json", "models"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(m["service"], m["name"]) for m in listed] == [("TextGeneration", "pico-lm"), ("Multimodal", "pico-tf")]
    assert listed[1]["imageSize"] == 32
    assert client_main(["--target", mm_server.target, "models"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[1:]] == ["pico-lm", "pico-tf"]
    assert "32px up to 128px" in table[2]


def test_the_async_client_streams_interleaved_parts_and_lists_image_models(mm_server, mm_client):
    import asyncio

    from prunefusion_client import AsyncClient

    options = ImageOptions(steps=2, seed=5)

    async def run():
        async with AsyncClient(mm_server.target, timeout=60, max_attempts=1) as client:
            parts = [p async for p in client.generate_interleaved("a red circle", options=options, max_tokens=4)]
            return parts, await client.list_image_models()

    def content(part):  # request ids differ per call
        return part.text or part.image.png

    parts, models = asyncio.run(run())
    sync = list(mm_client.generate_interleaved("a red circle", options=options, max_tokens=4))
    assert [content(p) for p in parts] == [content(p) for p in sync] and parts
    assert models == mm_client.list_image_models()
