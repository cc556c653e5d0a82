"""The OpenAI-compatible HTTP API through real sockets, with the official `openai` package (and curl) as clients,
checked against the gRPC API of the same server: HTTP == gRPC for the same request."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import time

import grpc
import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from prunefusion.server.config import parse_config
from prunefusion.server.engines.base import FinishReason
from prunefusion_client import Client, GenerateOptions, ImageOptions
from tests.conftest import ServerThread

PROMPT = "The os module"


@pytest.fixture(scope="module")
def http_server(pico_dir, transfusion_dir):
    config = parse_config({
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": None, "http_port": 0},
        "cache": {"enabled": False},
        "models": [
            {"name": "pico", "path": str(pico_dir), "max_batch_size": 4, "max_new_tokens_limit": 200,
             "default_max_new_tokens": 8, "chat_template": "plain"},
            {"name": "pico-one", "path": str(pico_dir), "max_batch_size": 1, "max_queue": 1,
             "max_new_tokens_limit": 200},
            {"name": "pico-full", "path": str(pico_dir), "max_batch_size": 1, "max_queue": 0,
             "max_new_tokens_limit": 200},
            {"name": "pico-tf", "path": str(transfusion_dir), "engine": "transfusion",
             "images": {"default_steps": 2, "max_wait_ms": 1}},
        ],
    })
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def base_url(http_server) -> str:
    return f"http://127.0.0.1:{http_server.server.http_port}/v1"


@pytest.fixture()
def oai(base_url):
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture()
def grpc_client(http_server):
    with Client(http_server.target, timeout=60, max_attempts=1) as c:
        yield c


def test_completion_equals_grpc_generate(oai, grpc_client):
    got = oai.completions.create(model="pico", prompt=PROMPT, max_tokens=12, temperature=0)
    want = grpc_client.generate(PROMPT, "pico", GenerateOptions(max_new_tokens=12, temperature=0))
    assert got.object == "text_completion" and got.model == "pico" and got.id.startswith("cmpl-")
    assert got.choices[0].text == want.text and want.text
    assert got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.usage.prompt_tokens, 12)
    assert got.usage.total_tokens == got.usage.prompt_tokens + 12


def test_streamed_completion_is_the_whole_one_in_pieces(oai):
    whole = oai.completions.create(model="pico", prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(oai.completions.create(model="pico", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1 and "".join(texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_a_list_of_prompts_gets_one_choice_each(oai, grpc_client):
    prompts = [PROMPT, "Lists and tuples"]
    got = oai.completions.create(model="pico", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in got.choices] == [0, 1]
    for choice, prompt in zip(got.choices, prompts, strict=True):
        assert choice.text == grpc_client.generate(prompt, "pico", GenerateOptions(max_new_tokens=6,
                                                                                   temperature=0)).text


def test_chat_renders_the_model_template_then_generates(oai, grpc_client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is os?"}]
    got = oai.chat.completions.create(model="pico", messages=messages, max_completion_tokens=8, temperature=0)
    # the "plain" template (server/engines/chat.py), written out by hand
    rendered = "system: Be brief.\nuser: What is os?\nassistant:"
    want = grpc_client.generate(rendered, "pico", GenerateOptions(max_new_tokens=8, temperature=0))
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    streamed = list(oai.chat.completions.create(model="pico", messages=messages, max_tokens=8, temperature=0,
                                                stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want.text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_a_model_without_a_chat_template_refuses_chat(oai):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="pico-one", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["param"] == "messages" and "no chat template" in err.value.body["message"]


def test_sampled_requests_follow_their_seed(oai):
    def sample(seed):
        return oai.completions.create(model="pico", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed,
                                      extra_body={"top_k": 50}).choices[0].text
    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


def test_models_lists_text_and_image_models(oai):
    ids = [m.id for m in oai.models.list().data]
    assert ids == ["pico", "pico-one", "pico-full", "pico-tf"]


def test_image_generation_equals_grpc(oai, grpc_client):
    got = oai.images.generate(model="pico-tf", prompt="a red circle on the left", response_format="b64_json",
                              extra_body={"seed": 3, "steps": 2})
    png = base64.b64decode(got.data[0].b64_json)
    want = grpc_client.generate_image("a red circle on the left", "pico-tf", ImageOptions(seed=3, steps=2))
    pixels = np.asarray(Image.open(io.BytesIO(png)))
    assert pixels.shape == (32, 32, 3)
    assert np.array_equal(pixels, np.asarray(Image.open(io.BytesIO(want.png))))


@pytest.mark.parametrize(("body", "param", "needle"), [
    ({"frobnicate": 1}, "frobnicate", "unknown parameter"),
    ({"best_of": 2}, "best_of", "not supported"),
    ({"echo": True}, "echo", "not supported"),
    ({"logit_bias": {"5": 10}}, "logit_bias", "not supported"),
    ({"n": 9}, "n", "[1, 8]"),
    ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
    ({"min_tokens": 300, "max_tokens": 10}, "min_tokens", "max_new_tokens"),
    ({"logprobs": 30}, "logprobs", "[0, 20]"),
    ({"max_tokens": 100000}, "max_tokens", "[1, 200]"),
    ({"temperature": 3}, "temperature", "[0, 2.0]"),
    ({"prompt": [10**6]}, "prompt", "outside the vocabulary"),
    ({"stop": 5}, "stop", ""),
])
def test_bad_parameters_are_400_naming_the_parameter(base_url, body, param, needle):
    reply = httpx.post(f"{base_url}/completions", json={"model": "pico", "prompt": PROMPT, **body}, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and needle in error["message"] and error["type"] == "invalid_request_error"


def test_a_timeout_header_is_the_requests_deadline(base_url, oai):
    body = {"model": "pico", "prompt": PROMPT, "max_tokens": 200, "min_tokens": 200, "temperature": 0}
    late = httpx.post(f"{base_url}/completions", json=body, headers={"X-Request-Timeout": "0.000001"}, timeout=30)
    assert late.status_code == 504, late.text
    assert late.json()["error"]["code"] == "deadline_exceeded"
    with httpx.stream("POST", f"{base_url}/completions", json={**body, "stream": True},
                      headers={"X-Request-Timeout": "0.000001"}, timeout=30) as stream:
        assert stream.status_code == 504  # out of time before the first token: refused before the 200
        assert json.loads(stream.read())["error"]["code"] == "deadline_exceeded"
    for bad in ("soon", "-1", "inf"):
        reply = httpx.post(f"{base_url}/completions", json=body, headers={"X-Request-Timeout": bad}, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "x-request-timeout", reply.text
    # the official client sends its own timeout (x-stainless-timeout: 60 here): far off, the request completes
    assert oai.completions.create(model="pico", prompt=PROMPT, max_tokens=4, temperature=0).usage.completion_tokens == 4


def test_noop_values_of_unsupported_parameters_are_accepted(oai):
    got = oai.completions.create(model="pico", prompt=PROMPT, max_tokens=4, temperature=0, best_of=1, echo=False,
                                 extra_body={"logit_bias": {}})
    assert got.usage.completion_tokens == 4


def test_token_id_prompts_and_penalties_equal_grpc(oai, http_server):
    from prunefusion_client.v1 import text_generation_pb2 as pb
    from prunefusion_client.v1 import text_generation_pb2_grpc as pb_grpc

    ids = [1, 266, 40, 87]
    with grpc.insecure_channel(http_server.target) as channel:
        want = pb_grpc.TextGenerationStub(channel).Generate(pb.GenerateRequest(
            model="pico", prompt_token_ids=ids, max_new_tokens=10, presence_penalty=1.0, repetition_penalty=1.2,
            min_new_tokens=3, logprobs=2), timeout=60)
    got = oai.completions.create(model="pico", prompt=ids, max_tokens=10, temperature=0, presence_penalty=1.0,
                                 logprobs=2, extra_body={"repetition_penalty": 1.2, "min_tokens": 3})
    assert got.choices[0].text == want.text and got.usage.prompt_tokens == len(ids)
    assert got.choices[0].logprobs.token_logprobs == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-6)
    assert got.choices[0].logprobs.tokens == [lp.token for lp in want.logprobs]
    # OpenAI's legacy shape keys alternatives by their text (two byte-fallback tokens can share one)
    assert [set(top) for top in got.choices[0].logprobs.top_logprobs] == [{t.token for t in lp.top}
                                                                          for lp in want.logprobs]


def test_chat_logprobs_and_n_samples(oai, grpc_client):
    messages = [{"role": "user", "content": "What is os?"}]
    got = oai.chat.completions.create(model="pico", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                      top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert "".join(c.token for c in content) == got.choices[0].message.content
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
    assert all(c.bytes == list(c.token.encode()) for c in content)
    sampled = oai.completions.create(model="pico", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5, n=3)
    singles = [grpc_client.generate(PROMPT, "pico", GenerateOptions(max_new_tokens=8, temperature=1.0, seed=5 + i)).text
               for i in range(3)]
    assert [c.index for c in sampled.choices] == [0, 1, 2] and [c.text for c in sampled.choices] == singles
    streamed = list(oai.completions.create(model="pico", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5, n=3,
                                           stream=True))
    assert ["".join(c.choices[0].text for c in streamed if c.choices[0].index == i) for i in range(3)] == singles


def test_errors_have_openai_shape_and_status(oai, base_url):
    with pytest.raises(openai.NotFoundError) as err:
        oai.completions.create(model="nope", prompt=PROMPT)
    assert err.value.body["code"] == "model_not_found"
    broken = httpx.post(f"{base_url}/completions", content=b"{not json", timeout=30)
    assert broken.status_code == 400 and broken.json()["error"]["param"] == "body"
    assert httpx.get(f"{base_url}/nothing-here", timeout=30).status_code == 404
    huge = httpx.post(f"{base_url}/completions", json={"model": "pico", "prompt": "x" * (2 << 20)}, timeout=30)
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "body"


def test_health_and_ready(base_url):
    root = base_url.removesuffix("/v1")
    assert httpx.get(f"{root}/health", timeout=10).json() == {"status": "ok"}
    assert httpx.get(f"{root}/ready", timeout=10).status_code == 200


def test_curl_reads_the_event_stream(base_url):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"model": "pico", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True})
    out = subprocess.run([curl, "-sN", "-H", "Content-Type: application/json", "-d", body,
                          f"{base_url}/completions"], capture_output=True, text=True, timeout=60, check=True).stdout
    events = [line.removeprefix("data: ") for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" for c in chunks)


def test_a_client_that_leaves_mid_stream_frees_its_slot(base_url, http_server):
    engine = http_server.engine("pico-one")
    cancelled = engine.finished[FinishReason.CANCELLED]
    body = {"model": "pico-one", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base_url}/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert engine.stats().running == 1
    deadline = time.monotonic() + 5
    while engine.stats().running or engine.stats().waiting:
        assert time.monotonic() < deadline, "the slot was not freed after the client went away"
        time.sleep(0.02)
    assert engine.finished[FinishReason.CANCELLED] == cancelled + 1


def test_a_full_queue_is_429_with_retry_after(base_url):
    """pico-full has one slot and no queue: while a stream holds the slot, the next request is refused."""
    body = {"model": "pico-full", "prompt": PROMPT, "max_tokens": 200, "temperature": 0}
    with httpx.stream("POST", f"{base_url}/completions", json={**body, "stream": True}, timeout=60) as running:
        assert running.status_code == 200
        refused = httpx.post(f"{base_url}/completions", json=body, timeout=30)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"


def test_python_client_chat_and_cli_logprobs(http_server, grpc_client, capsys):
    from prunefusion_client.cli import main

    reply = grpc_client.chat([("system", "Be brief."), ("user", "What is os?")], "pico",
                             GenerateOptions(max_new_tokens=8, temperature=0, logprobs=2))
    rendered = grpc_client.generate("system: Be brief.\nuser: What is os?\nassistant:", "pico",
                                    GenerateOptions(max_new_tokens=8, temperature=0))
    assert reply.text == rendered.text and len(reply.logprobs) == 8
    assert main(["--target", http_server.target, "chat", "What is os?", "--system", "Be brief.", "--model", "pico",
                 "--max-new-tokens", "8", "--temperature", "0", "--logprobs", "2"]) == 0
    out, err = capsys.readouterr()
    assert out == rendered.text + "\n"
    assert len([line for line in err.splitlines() if "\t" in line]) == 8  # one logprob line per token


def test_the_http_port_turns_nagle_off_on_every_connection():
    """A stream's events are small writes after the headers: with Nagle on, each waits for the client's delayed ACK
    (~40 ms on Linux) and TTFT over HTTP sat 45 ms above gRPC's. asyncio sets TCP_NODELAY on an accepted connection
    only when the listening socket says IPPROTO_TCP, so the socket the front end binds must."""
    import asyncio
    import socket

    from prunefusion.server.openai.frontend import bind_socket

    async def nodelay_of_an_accepted_connection() -> int:
        accepted = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        listening = bind_socket("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=listening)
        _, writer = await asyncio.open_connection(*listening.getsockname()[:2])
        try:
            return await asyncio.wait_for(accepted, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(nodelay_of_an_accepted_connection()) == 1
