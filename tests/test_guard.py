"""The request guard (server/guard.py) through a real server: undecodable, oversized and out-of-bounds requests are
INVALID_ARGUMENT before any work, with nothing logged at ERROR; plus what a server shows of itself (paths, services,
where a cached response came from)."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from conftest import ServerThread
from prometheus_client import REGISTRY

from prunefusion.server.config import parse_config
from prunefusion.server.guard import RequestBounds, echo, string_problem
from prunefusion_client.v1 import multimodal_pb2 as mm
from prunefusion_client.v1 import multimodal_pb2_grpc as mm_grpc
from prunefusion_client.v1 import quality_filter_pb2 as qf
from prunefusion_client.v1 import text_generation_pb2 as pb
from prunefusion_client.v1 import text_generation_pb2_grpc as pb_grpc

GENERATE = "/prunefusion.v1.TextGeneration/Generate"
GENERATE_STREAM = "/prunefusion.v1.TextGeneration/GenerateStream"
SCORE_STREAM = "/prunefusion.v1.QualityFilter/ScoreStream"
# bytes that are not a GenerateRequest: a string field holding invalid UTF-8, a wire type 7 (none such), a
# length-delimited field cut short, and 200 nested groups of an unknown field
UNDECODABLE = {"bad_utf8": b"\x12\x03\xff\xfe\xfd", "bad_wire_type": b"\x0f\x01\x02", "truncated": b"\x12\x10abc",
               "deep_nesting": b"\xfb\x01" * 200}


def rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("prunefusion_requests_rejected_total", {"reason": reason}) or 0.0


def raw_unary(channel, method: str, data: bytes, **kw) -> grpc.RpcError | bytes:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        return call(data, timeout=30, **kw)
    except grpc.RpcError as err:
        return err


@pytest.fixture()
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


# ---- pure -----------------------------------------------------------------------------------------------------
def test_string_bounds_walk_nested_repeated_and_map_fields():
    assert string_problem(pb.GenerateRequest(prompt="x" * 100_000, request_id="ok-1")) is None  # bulk text
    assert string_problem(pb.GenerateRequest(request_id="r" * 257)) == ("request_id", "257 characters; at most 256")
    assert string_problem(pb.GenerateRequest(stop=["a", "s" * 2000]))[0] == "stop[1]"
    where, why = string_problem(qf.ScoreRequest(documents=[qf.Document(id="ok", text="t"),
                                                           qf.Document(id="bad\nid", text="t")]))
    assert where == "documents[1].id" and "control" in why
    assert string_problem(qf.ScoreRequest(thresholds={"k" * 2000: 1.0}))[0].startswith("thresholds[")


def test_echo_is_one_short_line():
    shown = echo("a\r\nforged line" + "x" * 10_000)
    assert "\n" not in shown and "\r" not in shown and len(shown) < 120 and "10014 characters" in shown
    assert echo("short") == "'short'"


def test_bounds_are_per_service():
    bounds = RequestBounds({"prunefusion.v1.TextGeneration": 10}, other=5)
    assert bounds.of(GENERATE) == 10 and bounds.of("/grpc.health.v1.Health/Check") == 5


# ---- through the server ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(UNDECODABLE))
def test_undecodable_requests_are_invalid_argument_and_not_logged_as_errors(channel, name, caplog):
    before = rejected("undecodable")
    with caplog.at_level(logging.DEBUG):
        err = raw_unary(channel, GENERATE, UNDECODABLE[name])
        stream = channel.unary_stream(GENERATE_STREAM, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as streamed:
            list(stream(UNDECODABLE[name], timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details() == "the request is not a valid prunefusion.v1.GenerateRequest"
    assert streamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rejected("undecodable") == before + 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("undecodable request" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG) == 2


def test_undecodable_message_in_a_client_stream_is_invalid_argument(channel):
    call = channel.stream_stream(SCORE_STREAM, request_serializer=None, response_deserializer=None)
    good = qf.ScoreRequest(documents=[qf.Document(id="a", text="A plain sentence about a cat.")]).SerializeToString()
    replies = call(iter([good, UNDECODABLE["bad_utf8"]]), timeout=60)
    first = next(replies)
    assert qf.ScoreResponse.FromString(first).stats.documents == 1  # the good one is answered first
    with pytest.raises(grpc.RpcError) as err:
        next(replies)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prunefusion.v1.ScoreRequest" in err.value.details()


@pytest.mark.parametrize(("request_id", "why"), [("r" * 5000, "5000 characters"),
                                                   ("id\r\nFORGED log line", "control"), ("\x00", "control")])
def test_request_ids_are_short_printable_and_never_echoed_whole(channel, request_id, why):
    err = raw_unary(channel, GENERATE, pb.GenerateRequest(prompt="hi", request_id=request_id).SerializeToString())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("request_id: ")
    assert why in err.details() and "\n" not in err.details() and len(err.details()) < 200


def test_a_huge_model_name_gets_a_short_invalid_argument(channel):
    # a 20,000-character name once made NOT_FOUND's message exceed the client's limit (RESOURCE_EXHAUSTED)
    err = raw_unary(channel, GENERATE, pb.GenerateRequest(prompt="hi", model="m" * 20_000).SerializeToString())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.details()) < 200
    err = raw_unary(channel, GENERATE, pb.GenerateRequest(prompt="hi", model="m" * 200).SerializeToString())
    assert err.code() == grpc.StatusCode.NOT_FOUND and "(200 characters)" in err.details()
    assert len(err.details()) < 200


def test_oversized_requests_are_refused_before_parsing_even_compressed(channel):
    before = rejected("too_large")
    big = pb.GenerateRequest(prompt="a" * (2 << 20)).SerializeToString()  # 2 MiB > 1024 KiB for TextGeneration
    for compression in (None, grpc.Compression.Gzip):  # gzip: 2 MiB of "a" is a few KiB on the wire
        err = raw_unary(channel, GENERATE, big, compression=compression)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 1048576" in err.details()
    assert rejected("too_large") == before + 2
    # beyond the largest service bound gRPC itself refuses to decompress it
    huge = pb.GenerateRequest(prompt="a" * (40 << 20)).SerializeToString()
    assert raw_unary(channel, GENERATE, huge, compression=grpc.Compression.Gzip).code() == \
        grpc.StatusCode.RESOURCE_EXHAUSTED


def test_health_and_good_requests_pass_the_guard(channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status == \
        health_pb2.HealthCheckResponse.SERVING
    reply = pb_grpc.TextGenerationStub(channel).Generate(pb.GenerateRequest(prompt="hi", max_new_tokens=3,
                                                                            request_id="fine id: 1/2"))
    assert reply.request_id == "fine id: 1/2" and reply.usage.completion_tokens == 3


def test_model_paths_are_not_shown_unless_configured(server, channel, pico_dir):
    models = pb_grpc.TextGenerationStub(channel).ListModels(pb.ListModelsRequest()).models
    assert models and all(m.path == "" for m in models)
    config = parse_config({"server": {"host": "127.0.0.1", "port": 0, "metrics_port": None, "http_port": None,
                                      "expose_paths": True},
                           "cache": {"enabled": False}, "quality": {"enabled": False},
                           "models": [{"name": "p", "path": str(pico_dir)}]})
    shown = ServerThread(config).start()
    try:
        with grpc.insecure_channel(shown.target) as ch:
            assert pb_grpc.TextGenerationStub(ch).ListModels(pb.ListModelsRequest()).models[0].path == str(pico_dir)
    finally:
        shown.stop()


def test_a_service_without_models_is_not_served(server, channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with pytest.raises(grpc.RpcError) as err:
        mm_grpc.MultimodalStub(channel).ListImageModels(mm.ListImageModelsRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="prunefusion.v1.Multimodal"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    from prunefusion_client import Client

    with Client(server.target, max_attempts=1) as client:  # the client lists none rather than failing
        assert client.list_image_models() == [] and client.list_models()


def test_cache_source_tells_stored_entries_from_shared_runs(pico_dir, tmp_path):
    config = parse_config({"server": {"host": "127.0.0.1", "port": 0, "metrics_port": None, "http_port": None},
                           "cache": {"data_dir": str(tmp_path / "redis")}, "quality": {"enabled": False},
                           "models": [{"name": "p", "path": str(pico_dir), "max_new_tokens_limit": 200}]})
    server = ServerThread(config).start()
    try:
        async def run() -> list[pb.GenerateResponse]:
            async with grpc.aio.insecure_channel(server.target) as ch:
                stub = pb_grpc.TextGenerationStub(ch)
                request = pb.GenerateRequest(prompt="The os module", max_new_tokens=150)
                together = await asyncio.gather(*(stub.Generate(request) for _ in range(4)))
                return [*together, await stub.Generate(request)]

        *together, later = asyncio.run(run())
    finally:
        server.stop()
    sources = sorted(r.cache_source for r in together)
    assert sources[0] == pb.CACHE_SOURCE_UNSPECIFIED and not min(together, key=lambda r: r.cache_source).cached
    assert sources[1:] == [pb.CACHE_SOURCE_SHARED] * 3 and all(r.cached for r in together if r.cache_source)
    assert later.cached and later.cache_source == pb.CACHE_SOURCE_STORED
    assert len({r.text for r in [*together, later]}) == 1
