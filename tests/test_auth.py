"""API keys end to end: a real server with keys on, every RPC refused without a valid key and served with one,
quotas, allow-lists, reloads, the access log, metrics, and a hostile-metadata sweep."""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request

import grpc
import pytest
from conftest import ServerThread
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from prunefusion.server.auth.interceptor import bearer_token
from prunefusion.server.auth.keys import ApiKey, KeyFileError, KeyLimits, KeyStore, TokenBucket, hash_key, parse_keys
from prunefusion.server.config import parse_config
from prunefusion_client import Client, GenerateOptions, ImageOptions, score_request
from prunefusion_client.v1 import multimodal_pb2 as mm
from prunefusion_client.v1 import multimodal_pb2_grpc as mm_grpc
from prunefusion_client.v1 import quality_filter_pb2 as qf
from prunefusion_client.v1 import quality_filter_pb2_grpc as qf_grpc
from prunefusion_client.v1 import text_generation_pb2 as pb
from prunefusion_client.v1 import text_generation_pb2_grpc as pb_grpc

KEYS = {"alice": "pf-alice-0123456789abcdef", "limited": "pf-limited-0123456789", "single": "pf-single-0123456789",
        "pico-only": "pf-pico-only-0123456789", "later": "pf-later-0123456789"}
OPTIONS = {"limited": " rps=2 burst=2", "single": " concurrent=1", "pico-only": " models=pico-lm"}


def key_lines(*names: str) -> str:
    return "".join(f"{n} sha256:{hash_key(KEYS[n]).hex()}{OPTIONS.get(n, '')}\n" for n in names)


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "keys.txt"
    path.write_text("# name hash options\n" + key_lines("alice", "limited", "single", "pico-only"))
    return path


@pytest.fixture(scope="module")
def auth_server(keys_file, pico_dir, transfusion_dir):
    config = parse_config({
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "http_port": 0, "access_log": True,
                   "auth": {"api_keys_file": str(keys_file), "reload_seconds": 0.2, "metrics_requires_key": True}},
        "cache": {"enabled": False}, "quality": {"workers": 0},
        "models": [
            {"name": "pico-lm", "path": str(pico_dir), "max_batch_size": 2, "default_max_new_tokens": 4},
            {"name": "pico-tf", "path": str(transfusion_dir), "engine": "transfusion",
             "images": {"max_wait_ms": 0, "default_steps": 2}},
        ],
    })
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


def png_bytes() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="PNG")
    return buffer.getvalue()


# every RPC of the API: name -> a call with raw stubs and the given metadata
CALLS = {
    "Generate": lambda ch, md: pb_grpc.TextGenerationStub(ch).Generate(
        pb.GenerateRequest(prompt="a", max_new_tokens=2), metadata=md, timeout=30),
    "GenerateStream": lambda ch, md: list(pb_grpc.TextGenerationStub(ch).GenerateStream(
        pb.GenerateRequest(prompt="a", max_new_tokens=2), metadata=md, timeout=30)),
    "ListModels": lambda ch, md: pb_grpc.TextGenerationStub(ch).ListModels(pb.ListModelsRequest(), metadata=md,
                                                                           timeout=30),
    "GenerateImage": lambda ch, md: mm_grpc.MultimodalStub(ch).GenerateImage(
        mm.GenerateImageRequest(prompt="a red circle", steps=1), metadata=md, timeout=30),
    "Caption": lambda ch, md: mm_grpc.MultimodalStub(ch).Caption(
        mm.CaptionRequest(image=png_bytes(), max_tokens=2), metadata=md, timeout=30),
    "GenerateInterleaved": lambda ch, md: list(mm_grpc.MultimodalStub(ch).GenerateInterleaved(
        mm.GenerateInterleavedRequest(prompt="a", max_tokens=2, max_images=0, steps=1), metadata=md, timeout=30)),
    "ListImageModels": lambda ch, md: mm_grpc.MultimodalStub(ch).ListImageModels(
        mm.ListImageModelsRequest(), metadata=md, timeout=30),
    "Score": lambda ch, md: qf_grpc.QualityFilterStub(ch).Score(
        score_request(["Some text to score."], methods=["sharma"]), metadata=md, timeout=30),
    "ScoreStream": lambda ch, md: list(qf_grpc.QualityFilterStub(ch).ScoreStream(
        iter([score_request(["Some text."], methods=["sharma"])] * 2), metadata=md, timeout=30)),
    "Info": lambda ch, md: qf_grpc.QualityFilterStub(ch).Info(qf.QualityInfoRequest(), metadata=md, timeout=30),
    "Reflection": lambda ch, md: list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=md, timeout=30)),
}


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def code_of(call, channel, metadata) -> grpc.StatusCode:
    try:
        call(channel, metadata)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("rpc", list(CALLS))
def test_every_rpc_needs_a_valid_key(auth_server, rpc):
    with grpc.insecure_channel(auth_server.target) as channel:
        assert code_of(CALLS[rpc], channel, ()) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(CALLS[rpc], channel, bearer(KEYS["alice"][:-1] + "0")) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(CALLS[rpc], channel, bearer(KEYS["alice"])) == grpc.StatusCode.OK


def test_health_needs_no_key_and_the_client_sends_the_key(auth_server, monkeypatch):
    with grpc.insecure_channel(auth_server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    with Client(auth_server.target, max_attempts=1, api_key=KEYS["alice"]) as client:
        assert client.generate("a", options=GenerateOptions(max_new_tokens=2)).usage.completion_tokens == 2
    monkeypatch.setenv("PRUNEFUSION_API_KEY", KEYS["alice"])
    with Client(auth_server.target, max_attempts=1) as client:
        assert [m.name for m in client.list_models()] == ["pico-lm"]
    from prunefusion_client import Connection

    channel = Connection(api_key=KEYS["alice"]).channel(auth_server.target, [])
    try:  # a call's own authorization entry is replaced by the connection's, not sent beside it (two: refused)
        assert code_of(CALLS["ListModels"], channel, bearer("pf-stale")) == grpc.StatusCode.OK
    finally:
        channel.close()


def test_metrics_listen_on_ipv6_too():
    from prunefusion.server.metrics import start_metrics_server

    try:
        httpd, _ = start_metrics_server("::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        with urllib.request.urlopen(f"http://[::1]:{httpd.server_port}/metrics", timeout=10) as response:
            assert b"prunefusion_api_requests_total" in response.read()
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_the_async_client_sends_the_key_on_streams(auth_server):
    from prunefusion_client import AsyncClient

    async with AsyncClient(auth_server.target, max_attempts=1, api_key=KEYS["alice"]) as client:
        chunks = [c async for c in client.generate_stream("a", options=GenerateOptions(max_new_tokens=3))]
        assert chunks[-1].usage.completion_tokens == 3
        assert (await client.score(score_request(["Text."], methods=["sharma"]))).results
    async with AsyncClient(auth_server.target, max_attempts=1, api_key="pf-wrong") as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.list_models()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_rate_limit_refuses_with_a_retry_hint_and_recovers(auth_server, caplog):
    with caplog.at_level(logging.INFO, logger="prunefusion.server.access"), \
            grpc.insecure_channel(auth_server.target) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        time.sleep(1.1)  # a full bucket (2 tokens at 2/s)
        stub.ListModels(pb.ListModelsRequest(), metadata=bearer(KEYS["limited"]), timeout=10)
        stub.ListModels(pb.ListModelsRequest(), metadata=bearer(KEYS["limited"]), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListModels(pb.ListModelsRequest(), metadata=bearer(KEYS["limited"]), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "requests/s" in err.value.details()
        hint = dict(err.value.trailing_metadata())["grpc-retry-pushback-ms"]
        assert 0 < int(hint) <= 500
        # another key is not affected, and the limited one recovers once a token is due
        stub.ListModels(pb.ListModelsRequest(), metadata=bearer(KEYS["alice"]), timeout=10)
        time.sleep(int(hint) / 1000 + 0.05)
        stub.ListModels(pb.ListModelsRequest(), metadata=bearer(KEYS["limited"]), timeout=10)
    assert any("ListModels key=limited " in r.getMessage() and "status=RESOURCE_EXHAUSTED" in r.getMessage()
               for r in caplog.records)


def test_concurrency_limit_holds_while_a_stream_runs(auth_server, caplog):
    with caplog.at_level(logging.INFO, logger="prunefusion.server.access"), \
            grpc.insecure_channel(auth_server.target) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        stream = stub.GenerateStream(pb.GenerateRequest(prompt="a", max_new_tokens=200), metadata=bearer(
            KEYS["single"]), timeout=60)
        next(stream)  # the first chunk: the stream is in flight
        with pytest.raises(grpc.RpcError) as err:
            stub.ListModels(pb.ListModelsRequest(), metadata=bearer(KEYS["single"]), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "in flight" in err.value.details()
        stream.cancel()
        for _ in range(50):  # the slot is released when the cancelled call ends
            if code_of(CALLS["ListModels"], channel, bearer(KEYS["single"])) == grpc.StatusCode.OK:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the key's concurrency slot was never released")
    assert any("GenerateStream key=single " in r.getMessage() and "status=CANCELLED" in r.getMessage()
               for r in caplog.records)


def test_model_allow_list(auth_server):
    with grpc.insecure_channel(auth_server.target) as channel:
        md = bearer(KEYS["pico-only"])
        assert code_of(CALLS["Generate"], channel, md) == grpc.StatusCode.OK  # "" resolves to pico-lm
        assert code_of(CALLS["GenerateImage"], channel, md) == grpc.StatusCode.PERMISSION_DENIED
        stub = pb_grpc.TextGenerationStub(channel)
        stub.Generate(pb.GenerateRequest(model="pico-lm", prompt="a", max_new_tokens=1), metadata=md, timeout=30)


def wait_until_ok(channel, key: str, what: str) -> None:
    for _ in range(100):
        if code_of(CALLS["ListModels"], channel, bearer(key)) == grpc.StatusCode.OK:
            return
        time.sleep(0.05)
    pytest.fail(what)


def test_a_reload_keeps_counting_the_calls_in_flight(auth_server, keys_file, caplog):
    import queue

    original, requests = keys_file.read_text(), queue.Queue()

    def held_open():  # a ScoreStream stays in flight until its requests end: the test decides when
        while (item := requests.get()) is not None:
            yield item

    def open_stream(channel):
        stream = qf_grpc.QualityFilterStub(channel).ScoreStream(held_open(), metadata=bearer(KEYS["single"]),
                                                                timeout=60)
        requests.put(score_request(["Some text."], methods=["sharma"]))
        assert next(stream).results  # in flight now, holding the key's one slot
        return stream

    single = key_lines("single")
    try:
        with caplog.at_level(logging.INFO, logger="prunefusion.server.access"), \
                grpc.insecure_channel(auth_server.target) as channel:
            stream = open_stream(channel)
            keys_file.write_text(original.replace(single, single.replace(" concurrent=1", " concurrent=1 rps=50"))
                                 + key_lines("later"))  # single's limits change
            wait_until_ok(channel, KEYS["later"], "the rewritten keys file was not reloaded")
            assert code_of(CALLS["ListModels"], channel, bearer(KEYS["single"])) == grpc.StatusCode.RESOURCE_EXHAUSTED
            requests.put(None)
            assert list(stream) == []  # the call ends normally ...
            assert code_of(CALLS["ListModels"], channel, bearer(KEYS["single"])) == grpc.StatusCode.OK  # ... freed
            stream = open_stream(channel)
            stream.cancel()  # a cancelled stream frees its slot too
            wait_until_ok(channel, KEYS["single"], "a cancelled stream kept its key's slot")
            requests.put(None)
    finally:
        keys_file.write_text(original)
        time.sleep(0.6)
    lines = [r.getMessage() for r in caplog.records]
    assert any("ScoreStream key=single " in line and "status=OK" in line for line in lines)


def test_keys_create_appends_a_line_the_server_accepts(auth_server, keys_file, capsys):
    from prunefusion.cli import main

    original = keys_file.read_text()
    try:
        assert main(["keys", "create", "bob", "--file", str(keys_file), "--rps", "5", "--models", "pico-lm"]) == 0
        out = capsys.readouterr()
        key = out.out.strip()
        assert key.startswith("pf-") and key not in keys_file.read_text() and "bob sha256:" in out.err
        [bob] = [k for k in parse_keys(keys_file.read_text(), "keys") if k.name == "bob"]
        assert bob.limits == KeyLimits(requests_per_second=5) and bob.models == {"pico-lm"}
        with grpc.insecure_channel(auth_server.target) as channel:
            wait_until_ok(channel, key, "the created key was not accepted")
            assert code_of(CALLS["GenerateImage"], channel, bearer(key)) == grpc.StatusCode.PERMISSION_DENIED
        for argv, error in ((["bob"], "already has a key named 'bob'"), (["carol", "--rps", "0"], "--rps: "),
                            (["carol", "--concurrent", "-1"], "--concurrent: "),
                            (["carol", "--models", "a b"], "the new key's line"), (["no spaces"], "must match")):
            assert main(["keys", "create", *argv, "--file", str(keys_file)]) == 2
            assert error in capsys.readouterr().err
        assert "carol" not in keys_file.read_text()
    finally:
        keys_file.write_text(original)
        time.sleep(0.6)


def test_keys_reload_when_the_file_changes(auth_server, keys_file):
    original = keys_file.read_text()
    try:
        keys_file.write_text(original.replace(key_lines("alice"), "") + key_lines("later"))
        with grpc.insecure_channel(auth_server.target) as channel:
            for _ in range(100):
                if code_of(CALLS["ListModels"], channel, bearer(KEYS["later"])) == grpc.StatusCode.OK:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("a key added to the file was not accepted")
            assert code_of(CALLS["ListModels"], channel, bearer(KEYS["alice"])) == grpc.StatusCode.UNAUTHENTICATED
            keys_file.write_text("alice not-a-hash\n")  # a broken file keeps the keys in force
            time.sleep(0.6)
            assert code_of(CALLS["ListModels"], channel, bearer(KEYS["later"])) == grpc.StatusCode.OK
    finally:
        keys_file.write_text(original)
        time.sleep(0.6)


def test_access_log_and_metrics_name_the_key_never_the_key_itself(auth_server, caplog):
    with caplog.at_level(logging.INFO), grpc.insecure_channel(auth_server.target) as channel:  # every logger at INFO
        CALLS["Generate"](channel, bearer(KEYS["alice"]) + (("x-request-id", "r1"),))
        code_of(CALLS["Generate"], channel, bearer("pf-nobody"))
        pb_grpc.TextGenerationStub(channel).Generate(pb.GenerateRequest(prompt="a", max_new_tokens=1,
                                                                        request_id="secret-request-id"),
                                                     metadata=bearer(KEYS["alice"]), timeout=30)
    lines = [r.getMessage() for r in caplog.records]
    assert any("/prunefusion.v1.TextGeneration/Generate key=alice" in line and "status=OK" in line for line in lines)
    assert any("key=- " in line and "status=UNAUTHENTICATED" in line for line in lines)
    everything = caplog.text
    assert KEYS["alice"] not in everything and "pf-nobody" not in everything
    assert "secret-request-id" not in everything  # request ids are not logged at INFO (server.log_requests)
    url = f"http://127.0.0.1:{auth_server.server.metrics_port}/metrics"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=10)
    assert err.value.code == 401
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {KEYS['alice']}"})
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    assert 'prunefusion_api_requests_total{key="alice",result="ok"}' in text
    assert 'prunefusion_api_requests_total{key="-",result="unauthenticated"}' in text
    assert KEYS["alice"] not in text


HOSTILE = [
    ("authorization", ""), ("authorization", "Bearer"), ("authorization", "Bearer "),
    ("authorization", "Basic " + KEYS["alice"]), ("authorization", KEYS["alice"]),
    ("authorization", "Bearer  " + KEYS["alice"]), ("authorization", "Bearer " + KEYS["alice"] + " "),
    ("authorization", "Bearer " + "x" * 4000), ("authorization", "Bearer " + KEYS["alice"] + "x" * 300),
    ("authorization", "Bearer " + KEYS["alice"].upper()), ("authorization", "Bearer " + KEYS["alice"][:-1]),
    ("x-authorization", "Bearer " + KEYS["alice"]), ("authorization-bin", b"Bearer " + KEYS["alice"].encode()),
    ("authorization", "Bearer pf-\u00e9\u00e8"),
]


def hostile_metadata():
    """Malformed authorization metadata, none carrying a valid key the way the API asks for it."""
    for entry in HOSTILE:
        yield (entry,)
    for i in range(len(KEYS["alice"])):  # every single-character change of a valid key, the last byte included
        for replacement in ("0", "~"):
            changed = KEYS["alice"][:i] + replacement + KEYS["alice"][i + 1:]
            if changed != KEYS["alice"]:
                yield bearer(changed)
    yield bearer(KEYS["alice"]) + bearer(KEYS["alice"])  # repeated headers: refused, even both valid
    yield bearer("pf-wrong") + bearer(KEYS["alice"])


def test_hostile_metadata_sweep_serves_nothing(auth_server):
    counts: dict[str, int] = {}
    with grpc.insecure_channel(auth_server.target) as channel:
        for metadata in hostile_metadata():
            try:
                code = code_of(CALLS["ListModels"], channel, metadata)
            except ValueError:  # the client library refuses metadata it cannot send (non-ASCII text)
                code = "refused by the client"
            counts[str(code)] = counts.get(str(code), 0) + 1
        assert code_of(CALLS["ListModels"], channel, bearer(KEYS["alice"])) == grpc.StatusCode.OK  # still serving
    assert "StatusCode.OK" not in counts, counts
    assert sum(counts.values()) == 65  # 14 malformed entries, 49 one-character changes, 2 repeated headers
    # the non-ASCII one never leaves the client (grpc refuses it: ValueError or INTERNAL "Illegal header value")
    assert counts["StatusCode.UNAUTHENTICATED"] == 64, counts
    with grpc.insecure_channel(auth_server.target) as channel:  # scheme casing is RFC 7235's: accepted
        assert code_of(CALLS["ListModels"], channel, (("authorization", f"bEaReR {KEYS['alice']}"),)) \
            == grpc.StatusCode.OK


def test_key_parsing_names_the_line_and_matching_is_exact():
    with pytest.raises(KeyFileError, match=r"keys.txt:2: .*sha256"):
        parse_keys("a sha256:" + "0" * 64 + "\nb sha256:XYZ\n", "keys.txt")
    with pytest.raises(KeyFileError, match=r"keys.txt:1: unknown option 'qps'"):
        parse_keys("a sha256:" + "0" * 64 + " qps=3\n", "keys.txt")
    for pasted in (" pf-pasted-secret", " rps=pf-pasted-secret"):  # a key pasted into the wrong place is not echoed
        with pytest.raises(KeyFileError) as err:
            parse_keys("a sha256:" + "0" * 64 + pasted, "keys.txt")
        assert "pasted" not in str(err.value)
    with pytest.raises(KeyFileError, match="repeated: \\['a'\\]"):
        parse_keys(f"a sha256:{'0' * 64}\na sha256:{'1' * 64}\n", "keys.txt")
    [key] = parse_keys(f"a sha256:{hash_key('secret').hex()} rps=1.5 models=x,y # a comment\n", "k",
                       KeyLimits(max_concurrent=3))
    limits = KeyLimits(requests_per_second=1.5, max_concurrent=3)
    assert key.limits == limits and key.models == {"x", "y"}
    assert parse_keys(key.line(), "k") == [ApiKey("a", key.digest, limits, key.models)]
    store = KeyStore([key])
    assert store.match("secret") is key
    assert store.match("secreT") is None and store.match("") is None and store.match("secret" * 100) is None
    assert bearer_token(["Bearer x"]) == "x" and bearer_token(["Bearer x", "Bearer x"]) is None
    assert bearer_token([b"Bearer x"]) is None and bearer_token(["Token x"]) is None


def test_token_bucket_against_counting_by_hand():
    bucket = TokenBucket(rate=2.0, size=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)  # empty: one token every 0.5 s
    assert bucket.take(0.25) == pytest.approx(0.25)
    assert bucket.take(0.5) == 0.0
    assert bucket.take(10.0) == 0.0 and bucket.tokens == pytest.approx(2.0)  # refills to the size, not beyond


def test_auth_config_needs_a_key_source():
    from prunefusion.server.config import ConfigError

    with pytest.raises(ConfigError, match="server.auth.*api_keys_file or api_keys_env"):
        parse_config({"server": {"auth": {}}, "models": [{"name": "m", "path": "/x"}]})


def test_a_bad_keys_file_stops_the_start(tmp_path, pico_dir):
    from prunefusion.server.config import ConfigError

    bad = tmp_path / "keys.txt"
    bad.write_text("alice plaintext-key\n")
    config = parse_config({"server": {"host": "127.0.0.1", "port": 0, "metrics_port": None, "http_port": None,
                                      "auth": {"api_keys_file": str(bad)}},
                           "cache": {"enabled": False}, "quality": {"enabled": False},
                           "models": [{"name": "m", "path": str(pico_dir)}]})
    with pytest.raises(ConfigError, match="keys.txt:1: the second field must be sha256"):
        ServerThread(config).start()


def test_images_with_the_client_flags(auth_server, tmp_path, capsys):
    from prunefusion_client.cli import main as client_main

    with Client(auth_server.target, max_attempts=1, api_key=KEYS["alice"]) as client:
        assert client.generate_image("a red circle", options=ImageOptions(steps=1)).png
    assert client_main(["--target", auth_server.target, "models"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert client_main(["--target", auth_server.target, "--api-key", KEYS["alice"], "models"]) == 0
    assert "pico-tf" in capsys.readouterr().out


def test_sighup_reloads_the_keys(tmp_path, pico_dir):
    import os
    import signal

    from prunefusion.loadtest.server_process import ServerProcess

    keys = tmp_path / "keys.txt"
    keys.write_text(key_lines("alice"))
    config = tmp_path / "server.yaml"
    config.write_text(f"server: {{host: 127.0.0.1, metrics_port: null, http_port: null, auth: {{api_keys_file: {keys}, "
                      "reload_seconds: 3600}}\ncache: {enabled: false}\nquality: {enabled: false}\n"
                      f"models:\n  - name: pico\n    path: {pico_dir}\n")
    with ServerProcess(config, startup_timeout_s=120, log=tmp_path / "server.log") as server, \
            grpc.insecure_channel(server.target) as channel:
        keys.write_text(key_lines("alice", "later"))
        time.sleep(0.3)  # the file is polled once an hour here: only the signal reloads it
        assert code_of(CALLS["ListModels"], channel, bearer(KEYS["later"])) == grpc.StatusCode.UNAUTHENTICATED
        os.kill(server.proc.pid, signal.SIGHUP)
        for _ in range(100):
            if code_of(CALLS["ListModels"], channel, bearer(KEYS["later"])) == grpc.StatusCode.OK:
                break
            time.sleep(0.05)
        else:
            pytest.fail("SIGHUP did not reload the keys")
    assert "API keys reloaded (2 keys: alice, later)" in (tmp_path / "server.log").read_text()


def test_request_ids_reach_the_log_only_when_configured(pico_dir, caplog):
    config = parse_config({"server": {"host": "127.0.0.1", "port": 0, "metrics_port": None, "http_port": None,
                                      "log_requests": True},
                           "cache": {"enabled": False}, "quality": {"enabled": False},
                           "models": [{"name": "pico", "path": str(pico_dir)}]})
    assert parse_config({"models": [{"name": "m", "path": "/x"}]}).server.metrics_host == "127.0.0.1"
    server = ServerThread(config).start()
    try:
        with caplog.at_level(logging.INFO), grpc.insecure_channel(server.target) as channel:
            pb_grpc.TextGenerationStub(channel).Generate(pb.GenerateRequest(prompt="a", max_new_tokens=1,
                                                                            request_id="visible-id"), timeout=30)
        assert "request visible-id model=pico" in caplog.text
    finally:
        server.stop()


def test_keys_from_an_environment_variable_and_a_file_together(tmp_path, monkeypatch):
    from prunefusion.server.auth.keys import KeySource

    file = tmp_path / "keys.txt"
    file.write_text(key_lines("alice"))
    monkeypatch.setenv("PF_TEST_KEYS", key_lines("later", "limited"))
    source = KeySource.of(str(file), "PF_TEST_KEYS", KeyLimits(max_concurrent=2))
    store = source.load()
    assert sorted(store.by_name) == ["alice", "later", "limited"]
    assert store.match(KEYS["later"]).limits == KeyLimits(max_concurrent=2)
    assert store.match(KEYS["limited"]).limits == KeyLimits(requests_per_second=2.0, burst=2, max_concurrent=2)
    before = source.signature()
    monkeypatch.setenv("PF_TEST_KEYS", key_lines("alice"))
    assert source.signature() != before
    with pytest.raises(KeyFileError, match="repeated: \\['alice'\\]"):
        source.load()
    monkeypatch.delenv("PF_TEST_KEYS")
    with pytest.raises(KeyFileError, match="api_keys_env: the environment variable PF_TEST_KEYS is not set"):
        source.load()


# ---- the HTTP API: the same keys, limits and allow-lists ---------------------------------------------------------
def test_http_api_takes_the_same_keys(auth_server, caplog):
    import httpx

    base = f"http://127.0.0.1:{auth_server.server.http_port}"
    body = {"model": "pico-lm", "prompt": "a", "max_tokens": 2, "temperature": 0}

    def post(key: str | None, path: str = "/v1/completions", json=body, headers=None):
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(base + path, json=json, headers={**auth, **(headers or {})}, timeout=30)

    with caplog.at_level(logging.INFO, logger="prunefusion.server.access"):
        missing, wrong = post(None), post("pf-wrong-0123456789")
        assert post(KEYS["alice"]).status_code == 200
    # server.access_log over HTTP: the key's name (never the key), the peer and the status of every request
    lines = [r.getMessage() for r in caplog.records if r.name == "prunefusion.server.access"]
    assert any(line.startswith("POST /v1/completions key=alice peer=127.0.0.1:") and "status=200" in line
               for line in lines), lines
    assert sum("key=- " in line and "status=401" in line for line in lines) == 2, lines
    assert KEYS["alice"] not in caplog.text and "pf-wrong" not in caplog.text
    assert missing.status_code == wrong.status_code == 401
    assert missing.json() == wrong.json() and missing.json()["error"]["type"] == "authentication_error"
    assert KEYS["alice"] not in wrong.text
    assert post(KEYS["alice"]).status_code == 200
    assert post(None, headers={"Authorization": f"bearer {KEYS['alice']}"}).status_code == 200  # RFC 7235: any case
    assert httpx.get(base + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {KEYS['alice']}"},
                     timeout=30).status_code == 200
    assert httpx.get(base + "/health", timeout=30).status_code == 200  # liveness and readiness need no key
    assert httpx.get(base + "/ready", timeout=30).status_code == 200
    # the allow-list: pico-only may use the LM (by name, or as the default model) but not the image model
    assert post(KEYS["pico-only"]).status_code == 200
    image = post(KEYS["pico-only"], "/v1/images/generations", {"model": "pico-tf", "prompt": "a red circle"})
    assert image.status_code == 403 and image.json()["error"]["type"] == "permission_error"
    # the rate limit (rps=2, burst=2): the third call in a row is refused with Retry-After
    codes = [post(KEYS["limited"]) for _ in range(3)]
    assert [c.status_code for c in codes[:2]] == [200, 200] and codes[2].status_code == 429
    assert int(codes[2].headers["retry-after"]) >= 1
