"""The Embeddings service through real sockets: gRPC Embed and POST /v1/embeddings (the official `openai` client) on
the ONNX Runtime engine and the torch encoder engine, checked against sentence-transformers on the real
all-MiniLM-L6-v2; micro-batching, limits and errors on a pico encoder built in seconds."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np
import openai
import pytest
from conftest import ServerThread
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from pico import build_pico_bert

from prunefusion.quality.embeddings import minilm_dir
from prunefusion.server.config import ConfigError, load_config, parse_config
from prunefusion_client import AsyncClient, Client, vectors

ROOT = Path(__file__).resolve().parents[1]
# written for this test only: used for nothing else in the project
SENTENCES = [
    "The lighthouse keeper painted the railing green before the winter storms arrived.",
    "A small orchestra rehearsed in the empty train station every Thursday night.",
    "Fresh bread cools faster on a wire rack than on a wooden board.",
    "She folded the old map twice and tucked it behind the clock.",
    "Bicycles lined the canal, their baskets full of tulips and newspapers.",
]
# longer than MiniLM's 256 tokens: truncated as sentence-transformers truncates it
LONG_TEXT = " ".join(f"the {i}th pebble on the shore was round and grey" for i in range(60))
PICO_TEXTS = ["the cat sat on the mat .", "a dog ran in the park .", "the bird sang a song ."]


@pytest.fixture(scope="module")
def pico_dirs(tmp_path_factory) -> tuple[Path, Path]:
    from prunefusion.compression.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("pico-encoder")
    checkpoint = build_pico_bert(root / "pico-bert", PICO_TEXTS, layers=2)
    export_onnx(checkpoint, root / "pico-bert-onnx")
    return checkpoint, root / "pico-bert-onnx"


@pytest.fixture(scope="module")
def embed_server(pico_dirs, prunefusion_home):
    checkpoint, exported = pico_dirs
    pico = {"max_batch_size": 64, "embeddings": {"max_wait_ms": 500, "max_inputs": 4, "max_tokens": 10,
                                                 "truncate": False}}
    config = parse_config({
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": None, "http_port": 0},
        "cache": {"enabled": False}, "quality": {"enabled": False},
        "models": [
            {"name": "minilm", "engine": "onnx", "path": str(prunefusion_home / "minilm-onnx"), "build": "onnx:minilm",
             "embeddings": {"max_wait_ms": 1}},
            {"name": "minilm-torch", "engine": "torch-encoder", "path": str(minilm_dir()),
             "embeddings": {"max_wait_ms": 1}},
            {"name": "pico-onnx", "engine": "onnx", "path": str(exported), **pico},
            {"name": "pico-torch", "engine": "torch-encoder", "path": str(checkpoint), **pico},
            {"name": "pico-full", "engine": "onnx", "path": str(exported), "max_queue": 0},
        ],
    })
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


@pytest.fixture()
def client(embed_server):
    with Client(embed_server.target, timeout=60, max_attempts=1) as c:
        yield c


@pytest.fixture()
def oai(embed_server):
    base = f"http://127.0.0.1:{embed_server.server.http_port}/v1"
    with openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def grpc_vectors(client: Client, texts: list[str], model: str) -> np.ndarray:
    return np.array(vectors(client.embed(texts, model)), dtype=np.float32)


def test_onnx_and_torch_engines_match_sentence_transformers(client):
    from sentence_transformers import SentenceTransformer

    texts = [*SENTENCES, LONG_TEXT]
    reference = SentenceTransformer(str(minilm_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    onnx, torch = grpc_vectors(client, texts, "minilm"), grpc_vectors(client, texts, "minilm-torch")
    assert onnx.shape == torch.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(onnx, axis=1), 1.0, atol=1e-5)
    for got in (onnx, torch):
        cosines = (got * reference).sum(axis=1)
        assert cosines.min() >= 0.9999, cosines
    assert (onnx * torch).sum(axis=1).min() >= 0.9999
    assert (onnx[0] @ onnx[1]) < 0.9  # different sentences: different vectors (not a constant)


def test_http_equals_grpc(client, oai):
    want = client.embed(SENTENCES[:3], "minilm")
    # unset: the openai client asks for base64 and decodes it itself; asked for explicitly, base64 comes as is
    for encoding in (openai.NOT_GIVEN, "float", "base64"):
        got = oai.embeddings.create(model="minilm", input=SENTENCES[:3], encoding_format=encoding)
        assert got.object == "list" and got.model == "minilm"
        assert [d.index for d in got.data] == [0, 1, 2] and all(d.object == "embedding" for d in got.data)
        rows = [np.frombuffer(base64.b64decode(d.embedding), "<f4") if encoding == "base64" else d.embedding
                for d in got.data]
        np.testing.assert_allclose(np.array(rows), np.array(vectors(want)), atol=1e-6)
        assert got.usage.prompt_tokens == got.usage.total_tokens == want.prompt_tokens > 3 * 10
    one = oai.embeddings.create(model="minilm", input=SENTENCES[0], dimensions=384)  # a single string
    np.testing.assert_allclose(one.data[0].embedding, vectors(want)[0], atol=1e-6)


def test_pico_onnx_export_matches_its_torch_checkpoint(client):
    np.testing.assert_allclose(grpc_vectors(client, PICO_TEXTS, "pico-onnx"),
                               grpc_vectors(client, PICO_TEXTS, "pico-torch"), atol=1e-5)


def test_concurrent_requests_share_a_batch(embed_server, client):
    solo = [grpc_vectors(client, [t], "pico-onnx")[0] for t in PICO_TEXTS]

    async def together():
        async with AsyncClient(embed_server.target, timeout=60, max_attempts=1) as c:
            return await asyncio.gather(*(c.embed([t], "pico-onnx") for t in PICO_TEXTS))

    responses = asyncio.run(together())
    assert [r.timings.batch_size for r in responses] == [3, 3, 3]
    assert [r.timings.batch_texts for r in responses] == [3, 3, 3]
    for response, alone in zip(responses, solo, strict=True):  # a text's vector does not depend on its batch
        np.testing.assert_allclose(vectors(response)[0], alone, atol=1e-5)


@pytest.mark.parametrize(("texts", "field"), [
    ([], "texts"),
    (["the cat"] * 5, "texts"),  # max_inputs 4
    (["the cat", "  "], "texts[1]"),
    (["the cat", "the cat sat on the mat . a dog ran"], "texts[1]"),  # over max_tokens 10, truncation off
])
def test_grpc_errors_name_the_field(client, texts, field):
    with pytest.raises(grpc.RpcError) as err:
        client.embed(texts, "pico-onnx")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:"), err.value.details()


def test_grpc_overload_and_unknown_model(client):
    with pytest.raises(grpc.RpcError) as err:
        client.embed(["the cat"], "pico-full")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as err:
        client.embed(["the cat"], "nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "pico-onnx", "input": [1, 2, 3]}, 400, "input"),
    ({"model": "pico-onnx", "input": [[1, 2], [3]]}, 400, "input"),
    ({"model": "pico-onnx", "input": []}, 400, "input"),
    ({"model": "pico-onnx", "input": ["the cat", ""]}, 400, "input[1]"),
    ({"model": "pico-onnx", "input": "the cat", "dimensions": 16}, 400, "dimensions"),
    ({"model": "pico-onnx", "input": "the cat", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": "pico-onnx", "input": "the cat", "truncate": True}, 400, "truncate"),
    ({"model": "nope", "input": "the cat"}, 404, None),
    ({"model": "pico-full", "input": "the cat"}, 429, None),
])
def test_http_errors_name_the_parameter(embed_server, body, status, param):
    url = f"http://127.0.0.1:{embed_server.server.http_port}/v1/embeddings"
    response = httpx.post(url, json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    if param:
        assert error["message"].startswith(param), error


def test_health_reflection_and_listing(embed_server, client):
    with grpc.insecure_channel(embed_server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service="prunefusion.v1.Embeddings"), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert "prunefusion.v1.Embeddings" in services
    assert "prunefusion.v1.TextGeneration" not in services  # no text model here: not served, not listed
    models = {m.name: m for m in client.list_embedding_models()}
    assert list(models) == ["minilm", "minilm-torch", "pico-onnx", "pico-torch", "pico-full"]
    assert (models["minilm"].engine, models["minilm"].dimensions, models["minilm"].max_tokens) == ("onnx", 384, 256)
    assert (models["pico-torch"].engine, models["pico-torch"].num_layers) == ("torch-encoder", 2)
    assert not models["pico-onnx"].truncate and models["pico-onnx"].max_inputs == 4


def test_http_models_lists_the_embedding_models(oai):
    listed = {m.id: m for m in oai.models.list().data}
    assert list(listed) == ["minilm", "minilm-torch", "pico-onnx", "pico-torch", "pico-full"]
    assert listed["minilm"].max_model_len == 256


def test_client_cli_embed(embed_server, client):
    done = subprocess.run([sys.executable, "-m", "prunefusion_client.cli", "--target", embed_server.target,
                           "embed", *PICO_TEXTS[:2], "--model", "pico-onnx"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    printed = [json.loads(line) for line in done.stdout.splitlines()]
    np.testing.assert_allclose(printed, grpc_vectors(client, PICO_TEXTS[:2], "pico-onnx"), atol=1e-6)
    assert "dimensions=32" in done.stderr


def test_configs():
    config = load_config(ROOT / "deploy" / "configs" / "embeddings-minilm.yaml")
    assert [(m.name, m.engine, m.build) for m in config.models] == [
        ("minilm", "onnx", "onnx:minilm"), ("minilm-pruned", "onnx", "onnx:minilm-2of6")]
    base = {"name": "e", "path": "/x"}
    with pytest.raises(ConfigError, match="images"):
        parse_config({"models": [{**base, "engine": "torch-encoder", "images": {}}]})
    with pytest.raises(ConfigError, match="dtype"):
        parse_config({"models": [{**base, "engine": "onnx", "dtype": "bfloat16"}]})
    with pytest.raises(ConfigError, match="onnx:nope"):
        parse_config({"models": [{**base, "engine": "onnx", "build": "onnx:nope"}]})
