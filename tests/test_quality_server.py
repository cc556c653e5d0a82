"""The QualityFilter gRPC service end to end, against the pure pipeline it wraps."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import ServerThread

from prunefusion.quality.pipeline import ScoreOptions, reason_codes, score_batch
from prunefusion.quality.sharma import Weights, load_weights
from prunefusion.server.config import parse_config
from prunefusion_client import Client, score_request

CLEAN = ("The library reads the configuration file when the program starts. It checks that every value has the "
         "right type and that the paths exist.\n\nWhen a value is wrong, the error names the field and the line, so "
         "that the user can fix it without reading the source. The defaults are chosen to be safe, and each one is "
         "documented with the reason it was chosen. Most of the options can also be set from the command line, "
         "which is often easier when you want to try something for a single run.")
JUNK = "\n".join(["Home | About | Contact", "Accept all cookies", "Click here!", "Menu"] * 5)


@pytest.fixture(scope="module")
def quality_server(pico_dir):
    config = parse_config({
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": None, "http_port": None},
        "cache": {"enabled": False},
        "quality": {"workers": 0, "max_batch_documents": 50, "max_concurrent_batches": 1},
        "models": [{"name": "pico", "path": str(pico_dir)}],
    })
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


@pytest.fixture()
def qclient(quality_server):
    with Client(quality_server.target, timeout=60, max_attempts=1) as c:
        yield c


def test_score_annotates_and_equals_the_pure_pipeline(qclient):
    docs = [("clean", CLEAN), ("junk", JUNK)]
    reply = qclient.score(score_request(docs, line_spans=True))
    by_id = {r.id: r for r in reply.results}
    assert by_id["clean"].keep and not by_id["clean"].reasons
    assert not by_id["junk"].keep and by_id["junk"].reasons
    assert by_id["clean"].score > by_id["junk"].score
    expected = score_batch(docs, ScoreOptions(line_spans=True), load_weights(None))
    for want in expected.results:
        got = by_id[want.id]
        assert got.score == pytest.approx(want.score) and tuple(got.reasons) == want.reasons
        assert dict(got.signals) == pytest.approx(want.signals)
        assert [(s.start, s.end) for s in got.lines] == [(a, b) for a, b, _ in want.lines]
    first = by_id["clean"].lines[0]
    assert CLEAN[first.start:first.end].startswith("The library reads")
    assert reply.stats.documents == 2 and reply.stats.kept == 1
    assert dict(reply.stats.reason_counts) == {r: 1 for r in by_id["junk"].reasons}


def test_drop_mode_min_score_and_percentile(qclient):
    docs = [("clean", CLEAN), ("junk", JUNK), ("clean2", CLEAN.replace("library", "program"))]
    dropped = qclient.score(score_request(docs, drop=True))
    assert sorted(r.id for r in dropped.results) == ["clean", "clean2"] and dropped.stats.kept == 2
    sharma_only = qclient.score(score_request(docs, methods=["sharma"], min_score=0.99))
    assert all("sharma_below_min_score" in r.reasons for r in sharma_only.results if r.score < 0.99)
    bottom = qclient.score(score_request(docs, methods=["sharma"], drop_bottom_percent=50))
    assert [r.id for r in bottom.results if "sharma_bottom_percentile" in r.reasons] == ["junk"]


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"methods": ["sharma", "perplexity"]}, "perplexity"),
    ({"thresholds": {"gopher_quality.max_foo": 1.0}}, "max_foo"),
    ({"thresholds": {"nodot": 1.0}}, "nodot"),
    ({"methods": ["c4"], "min_score": 0.5}, "sharma"),
    ({"min_score": 1.5}, "min_score"),
    ({"rule_profile": "spacy"}, "rule_profile"),
    ({"thresholds": {"gopher_quality.min_words": 20}}, "min_words"),  # gopher-paper's name, not datatrove's
])
def test_bad_options_are_invalid_argument_naming_the_problem(qclient, kwargs, needle):
    with pytest.raises(grpc.RpcError) as err:
        qclient.score(score_request([CLEAN], **kwargs))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()


def test_batch_limits(qclient):
    with pytest.raises(grpc.RpcError) as err:
        qclient.score(score_request([CLEAN] * 51))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 50" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        qclient.score(score_request([("a", CLEAN), ("a", JUNK)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unique" in err.value.details()


def test_overload_is_resource_exhausted(qclient):
    big = score_request([CLEAN * 20] * 50)  # one slot, one waiting: the rest of 6 concurrent batches are refused
    codes = []

    def one(_):
        try:
            qclient.score(big)
            return "OK"
        except grpc.RpcError as err:
            return err.code().name

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(one, range(6)))
    assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes, codes


def test_rule_profiles_over_grpc_equal_the_pipeline_and_return_c4_rewrites(qclient):
    cited = CLEAN.replace("right type", "right type[1]") + "\nMenu\nShare this page"
    docs = [("cited", cited), ("junk", JUNK)]
    for profile in ("datatrove", "gopher-paper"):
        reply = qclient.score(score_request(docs, rule_profile=profile))
        expected = score_batch(docs, ScoreOptions(rule_profile=profile), load_weights(None))
        assert [(r.id, tuple(r.reasons)) for r in reply.results] == [(r.id, r.reasons) for r in expected.results]
    datatrove = {r.id: r for r in qclient.score(score_request(docs)).results}  # the server's default profile
    # C4 left the kept lines without their citation mark: no blank line, no menu lines
    assert datatrove["cited"].keep and datatrove["cited"].text == CLEAN.replace("\n\n", "\n")
    assert not datatrove["junk"].HasField("text") and len(datatrove["junk"].reasons) == 1  # first reason only
    paper = {r.id: r for r in qclient.score(score_request(docs, rule_profile="gopher-paper")).results}
    assert not paper["cited"].HasField("text") and len(paper["junk"].reasons) > 1  # every failed rule


def test_stream_answers_in_order_and_info_describes_the_service(qclient):
    requests = [score_request([(f"{k}-{i}", CLEAN if i % 2 else JUNK) for i in range(3)]) for k in range(4)]
    replies = list(qclient.score_stream(requests))
    assert [[r.id for r in reply.results] for reply in replies] == [[f"{k}-{i}" for i in range(3)] for k in range(4)]
    info = qclient.quality_info()
    assert "sharma" in info.methods and set(info.reason_codes) == set(reason_codes())
    assert info.default_thresholds["gopher_quality.min_doc_words"] == 50 and info.max_batch_documents == 50
    assert info.default_thresholds["c4.filter_no_terminal_punct"] == 1.0  # a flag, as 0/1
    assert list(info.rule_profiles) == ["datatrove", "gopher-paper"] and info.default_rule_profile == "datatrove"
    assert dict(info.weights) == pytest.approx(load_weights(None).values)
    provenance = load_weights(None).provenance  # with the path of the model it was calibrated on, whose name only
    assert provenance["reference_model"].startswith("/tmp/") and "/tmp" not in info.weights_provenance_json
    assert json.loads(info.weights_provenance_json) == {**provenance, "reference_model": "tiny-lm"}


@pytest.mark.slow
def test_worker_processes_give_the_same_results(server):
    """The main test server scores in 2 worker processes (the default), forked from a preloaded forkserver."""
    docs = [(str(i), CLEAN if i % 3 else JUNK) for i in range(12)]
    with Client(server.target, timeout=120, max_attempts=1) as c:
        reply = c.score(score_request(docs))
    expected = score_batch(docs, ScoreOptions(), load_weights(None))
    assert [(r.id, r.keep, tuple(r.reasons)) for r in reply.results] == [
        (r.id, r.keep, r.reasons) for r in expected.results]
    assert isinstance(load_weights(None), Weights)


def test_a_disabled_service_is_neither_answered_nor_reported_healthy(pico_dir):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    config = parse_config({"server": {"host": "127.0.0.1", "port": 0, "metrics_port": None, "http_port": None},
                           "cache": {"enabled": False}, "quality": {"enabled": False},
                           "models": [{"name": "pico", "path": str(pico_dir)}]})
    thread = ServerThread(config).start()
    try:
        with Client(thread.target, timeout=30, max_attempts=1) as c, grpc.insecure_channel(thread.target) as channel:
            with pytest.raises(grpc.RpcError) as err:
                c.score(score_request([CLEAN]))
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            health = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                health.Check(health_pb2.HealthCheckRequest(service="prunefusion.v1.QualityFilter"), timeout=5)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            reply = health.Check(health_pb2.HealthCheckRequest(service="prunefusion.v1.TextGeneration"), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        thread.stop()


def test_batch_methods_over_grpc(qclient):
    from test_quality_semdedup import EPS, GROUPS

    group = GROUPS[1]  # an original and two whitespace/punctuation variants
    docs = [("orig", group[0]), ("space", group[1]), ("punct", group[2]), ("clean", CLEAN), ("junk", JUNK)]
    request = score_request(docs, methods=["sharma", "semdedup", "long_file", "outlier"],
                            thresholds={"semdedup.eps": EPS, "long_file.drop_top_percent": 20})
    by_id = {r.id: r for r in qclient.score(request).results}
    kept = [i for i in ("orig", "space", "punct") if "semdedup_duplicate" not in by_id[i].reasons]
    assert len(kept) == 1
    assert {by_id[i].duplicate_of for i in ("orig", "space", "punct") if i != kept[0]} == {kept[0]}
    assert by_id["clean"].duplicate_of == "" and "long_file" in by_id["clean"].reasons  # the longest of 5
    distances = [r.signals["centroid_distance"] for r in by_id.values() if "centroid_distance" in r.signals]
    assert len(distances) == len(docs) and all(0 <= d <= 2 for d in distances) and max(distances) > 0
    info = qclient.quality_info()
    assert {"semdedup", "long_file", "outlier"} <= set(info.methods)
    assert info.default_thresholds["semdedup.eps"] == pytest.approx(0.01)
    assert {"semdedup_duplicate", "long_file", "centroid_outlier"} <= set(info.reason_codes)


def test_the_async_client_scores_as_the_sync_one(quality_server, qclient):
    from prunefusion_client import AsyncClient

    requests = [score_request([(f"{k}-{i}", CLEAN if i % 2 else JUNK) for i in range(3)]) for k in range(2)]

    async def run():
        async with AsyncClient(quality_server.target, timeout=60, max_attempts=1) as client:
            one = await client.score(requests[0])
            streamed = [reply async for reply in client.score_stream(requests)]
            return one, streamed, await client.quality_info()

    one, streamed, info = asyncio.run(run())
    assert one.results == qclient.score(requests[0]).results
    assert [r.results for r in streamed] == [r.results for r in qclient.score_stream(requests)]
    assert info == qclient.quality_info()


# -- one scoring worker: a request that leaves stops its batch (issue 17) ------------------------------------------
@pytest.fixture(scope="module")
def worker_server(pico_dir):
    config = parse_config({
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": None, "http_port": None},
        "cache": {"enabled": False},
        "quality": {"workers": 1, "max_concurrent_batches": 2},
        "models": [{"name": "pico", "path": str(pico_dir)}],
    })
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


def _busy_request():
    """Ten seconds and more of scoring: 8 distinct documents of 200 KB of punctuation without whitespace."""
    from prunefusion.quality.rule_corpus import ADVERSARIAL

    base = ADVERSARIAL["random_punctuation"](200_000)
    return score_request([(str(i), base[i * 997:] + base[:i * 997]) for i in range(8)])


def _seconds_until_a_small_score(target: str) -> float:
    started = time.monotonic()
    with Client(target, timeout=30, max_attempts=1) as c:
        assert c.score(score_request([("clean", CLEAN)])).results[0].keep
    return time.monotonic() - started


@pytest.mark.slow
def test_a_score_past_its_deadline_stops_and_frees_its_worker_within_a_second(worker_server):
    with Client(worker_server.target, timeout=60, max_attempts=1) as c:
        c.score(score_request([CLEAN]))  # the worker is up
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            c.score(_busy_request(), timeout=1.0)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 3
    assert _seconds_until_a_small_score(worker_server.target) < 1.0  # before: after the whole batch (10 s and more)
    assert worker_server.server._quality.healthy()


@pytest.mark.slow
def test_a_cancelled_score_frees_its_worker_within_a_second(worker_server):
    from prunefusion_client.v1 import quality_filter_pb2_grpc

    with grpc.insecure_channel(worker_server.target) as channel:
        call = quality_filter_pb2_grpc.QualityFilterStub(channel).Score.future(_busy_request(), timeout=60)
        time.sleep(1.0)  # scoring by now
        assert call.cancel()
    assert _seconds_until_a_small_score(worker_server.target) < 1.0


def test_a_dead_worker_is_replaced_and_health_stays_serving(worker_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    quality = worker_server.server._quality
    _seconds_until_a_small_score(worker_server.target)
    [pid] = quality._workers.pids()
    os.kill(pid, signal.SIGKILL)
    time.sleep(2.5)  # the health watcher looks every second
    assert quality.healthy() and quality._workers.pids() not in ([], [pid])
    with grpc.insecure_channel(worker_server.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="prunefusion.v1.QualityFilter"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert _seconds_until_a_small_score(worker_server.target) < 5


def test_a_document_over_the_bound_is_answered_at_once_unscored(worker_server):
    big = "It is. " * (300_000 // 7)  # over the default 256 KiB
    _seconds_until_a_small_score(worker_server.target)  # the worker is up
    with Client(worker_server.target, timeout=60, max_attempts=1) as c:
        started = time.monotonic()
        reply = c.score(score_request([("big", big), ("clean", CLEAN)]))
        seconds = time.monotonic() - started
    by_id = {r.id: r for r in reply.results}
    assert tuple(by_id["big"].reasons) == ("document_too_long",) and not by_id["big"].HasField("score")
    assert by_id["clean"].keep and seconds < 1.0


def test_the_reply_is_built_off_the_event_loop(worker_server):
    """80,000 line spans: building their reply takes tens of ms (0.5 s on a busy host); the server's event loop must
    not stall for it. Its longest stall is measured by a heartbeat on that loop during the call."""
    from prunefusion.server.servicers.quality_filter import _result_pb

    text = "a.\n" * 80_000
    expected = score_batch([("lines", text)], ScoreOptions(line_spans=True), load_weights(None))
    started = time.perf_counter()
    _result_pb(expected, "x", started)
    build = time.perf_counter() - started

    async def heartbeat(stop):
        worst, last = 0.0, time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            worst, last = max(worst, now - last), now
        return worst

    stop = threading.Event()
    beat = asyncio.run_coroutine_threadsafe(heartbeat(stop), worker_server.loop)
    with Client(worker_server.target, timeout=60, max_attempts=1) as c:
        reply = c.score(score_request([("lines", text)], line_spans=True))
    stop.set()
    assert len(reply.results[0].lines) == 80_000
    assert beat.result(10) < max(build / 2, 0.02), (beat.result(), build)


def test_info_names_no_server_path(tmp_path):
    from prunefusion.server.config import QualityConfig
    from prunefusion.server.servicers.quality_filter import QualityFilterServicer
    from prunefusion_client.v1 import quality_filter_pb2 as pb

    provenance = {"reference_model": "/srv/secret/models/tiny-lm", "data": {"files": ["/data/a.jsonl", "b.jsonl"]},
                  "weights": "~/weights/w.json", "method": "w = (a - b) / a", "home": "C:\\Users\\x\\m.json"}
    Weights(load_weights(None).values, provenance).save(tmp_path / "weights.json")
    servicer = QualityFilterServicer(QualityConfig(weights=str(tmp_path / "weights.json"), workers=0))
    info = asyncio.run(servicer.Info(pb.QualityInfoRequest(), None))
    assert json.loads(info.weights_provenance_json) == {
        "reference_model": "tiny-lm", "data": {"files": ["a.jsonl", "b.jsonl"]}, "weights": "w.json",
        "method": "w = (a - b) / a", "home": "m.json"}
    servicer.close()


def test_the_per_document_bound_in_the_pipeline():
    """Over the bound (UTF-8 bytes: 'é' is two): unexamined, no score, left out of the batch's percentile."""
    docs = [("big", "é" * 600), ("clean", CLEAN), ("junk", JUNK)]
    result = score_batch(docs, ScoreOptions(max_document_bytes=1000, drop_bottom_percent=50), load_weights(None))
    by_id = {r.id: r for r in result.results}
    assert by_id["big"].reasons == ("document_too_long",) and by_id["big"].score is None
    assert "sharma_bottom_percentile" in by_id["junk"].reasons and by_id["clean"].keep
    assert result.mean_score == pytest.approx((by_id["clean"].score + by_id["junk"].score) / 2)
    assert score_batch(docs[:1], ScoreOptions(max_document_bytes=1200), load_weights(None)).results[0].score is not None
