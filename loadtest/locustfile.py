"""Locust users for prunefusion's gRPC API (`prunefusion loadtest` runs this headless; or run locust yourself):

    locust -f loadtest/locustfile.py PrunefusionUser --headless -u 4 -r 4 -t 30s --host localhost:50051 \
        --pf-model tiny-lm

(name the user class: without one, locust runs both classes below at once, closed and open loop mixed)

Imports only grpc, the stubs, the client, and numpy + PIL for the shapes-world images: never torch or transformers
(they break locust's gevent ssl patching). Each call fires a locust request event named after its RPC
(`Generate`, `GenerateStream`, `GenerateImage`, `Caption`, `Score`, `Embed`; mixed by the --pf-*-weight options)
and, on a stream's first non-empty chunk, a separate `TTFT` event. With --pf-records, every request also appends
one JSON line (wall-clock start, TTFT, e2e, token count, inter-chunk gaps, status code) so percentiles are computed
exactly, with warm-up excluded, afterwards. A request the run's stop timeout kills is recorded as CUT_OFF, and a
client-side failure as CLIENT_<exception>, so neither drops out of the statistics unseen.

Two user classes: `PrunefusionUser` (closed loop: the next request as soon as the previous one ends; -u N users)
and `PoissonArrivals` (open loop: one user starts requests at exponential intervals of mean 1/--pf-rate seconds,
whether or not earlier ones have finished).
"""

from __future__ import annotations

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any channel exists: gRPC's polling must yield to gevent

import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

import gevent.pool  # noqa: E402
import grpc  # noqa: E402
from locust import User, constant, events, task  # noqa: E402
from locust.contrib.fasthttp import FastHttpSession  # noqa: E402

from prunefusion_client import Client, GenerateOptions, ImageOptions, connection, score_request  # noqa: E402

# a fixed vocabulary: seeded prompts of a controlled length, never served from the cache by accident (bypass)
WORDS = ("the", "module", "function", "returns", "value", "list", "object", "string", "file", "path", "error", "class",
         "method", "data", "type", "number", "system", "call", "argument", "default", "result", "name", "time",
         "process", "thread", "socket", "buffer", "stream")
_user_ids = itertools.count()
_records = None


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--pf-model", default="", help="model name (default: the server's first)")
    parser.add_argument("--pf-prompt-words", type=int, default=32, help="words per synthetic prompt")
    parser.add_argument("--pf-max-new-tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument("--pf-stream-weight", type=int, default=1, help="relative weight of GenerateStream calls")
    parser.add_argument("--pf-unary-weight", type=int, default=0, help="relative weight of Generate calls")
    parser.add_argument("--pf-image-weight", type=int, default=0, help="relative weight of GenerateImage calls")
    parser.add_argument("--pf-caption-weight", type=int, default=0, help="relative weight of Caption calls")
    parser.add_argument("--pf-image-model", default="", help="Transfusion model (default: the server's first)")
    parser.add_argument("--pf-image-steps", type=int, default=20, help="denoising steps per GenerateImage")
    parser.add_argument("--pf-score-weight", type=int, default=0, help="relative weight of QualityFilter Score calls")
    parser.add_argument("--pf-score-docs", type=int, default=16, help="documents per Score call (~1 KB each)")
    parser.add_argument("--pf-embed-weight", type=int, default=0, help="relative weight of Embed calls")
    parser.add_argument("--pf-embed-model", default="", help="embedding model (default: the server's first)")
    parser.add_argument("--pf-embed-texts", type=int, default=8, help="texts per Embed call (--pf-prompt-words "
                        "words each)")
    parser.add_argument("--pf-rate", type=float, default=1.0, help="PoissonArrivals: requests per second")
    parser.add_argument("--pf-cache", default="bypass", choices=["default", "bypass", "refresh"])
    parser.add_argument("--pf-seed", type=int, default=0)
    parser.add_argument("--pf-records", default="", help="append one JSON line per request to this file")
    parser.add_argument("--pf-api", default="grpc", choices=["grpc", "http"],
                        help="http: text requests through the OpenAI-compatible API (/v1/completions, SSE streams)")
    parser.add_argument("--pf-http-url", default="http://127.0.0.1:8000", help="--pf-api http: the API's base URL")
    connection.add_arguments(parser, prefix="pf-")  # the key itself comes through $PRUNEFUSION_API_KEY


@events.test_start.add_listener
def _open_records(environment, **_kwargs) -> None:
    global _records
    path = environment.parsed_options.pf_records
    _records = open(path, "a", buffering=1) if path else None  # noqa: SIM115 - closed at test_stop


@events.test_stop.add_listener
def _close_records(environment, **_kwargs) -> None:
    global _records
    if _records is not None:
        _records.close()
        _records = None


def synthetic_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize()


def shapes_png(rng: random.Random) -> bytes:
    """A rendered shapes-world scene as PNG bytes (what a Caption client sends)."""
    import io

    import numpy as np
    from PIL import Image

    from prunefusion.transfusion import shapes

    scene = rng.choice(shapes.all_scenes())
    buffer = io.BytesIO()
    Image.fromarray(shapes.render(scene, rng=np.random.default_rng(rng.getrandbits(32)))).save(buffer, format="PNG")
    return buffer.getvalue()


def shapes_prompt(rng: random.Random) -> str:
    from prunefusion.transfusion import shapes

    return rng.choice(shapes.all_scenes()).caption()


class HttpStatus(Exception):
    def __init__(self, status: int, message: str = ""):
        super().__init__(f"HTTP {status} {message}".strip())
        self.status = status


class _TokenTimes:
    """One stream's time to first token and gaps between token-bearing chunks, each timed when it arrives; the
    first is also fired as a locust "TTFT" event (of `api`) so locust's own stats show it."""

    def __init__(self, api: str, t0: float) -> None:
        self.api, self.t0 = api, t0
        self.ttft: float | None = None
        self.gaps: list[float] = []
        self._last: float | None = None

    def arrived(self) -> None:
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.t0
            events.request.fire(request_type=self.api, name="TTFT", response_time=self.ttft * 1000,
                                response_length=0, exception=None, context={})
        else:
            self.gaps.append(now - self._last)
        self._last = now


class _Silent:
    """A request-event hook that drops what it is given."""

    def fire(self, **_kwargs) -> None:
        pass


class _Calls(User):
    """The RPCs and the per-request record; subclasses decide when requests start."""

    abstract = True
    wait_time = constant(0)

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.opts = o
        self.rng = random.Random(o.pf_seed * 1_000_003 + next(_user_ids))
        self.api = Client(self.host, max_attempts=1, timeout=300,  # no retries: a load test counts failures
                          connection=connection.from_args(o, prefix="pf-"))
        self.weights = {"GenerateStream": o.pf_stream_weight, "Generate": o.pf_unary_weight,
                        "GenerateImage": o.pf_image_weight, "Caption": o.pf_caption_weight, "Score": o.pf_score_weight,
                        "Embed": o.pf_embed_weight}
        if sum(self.weights.values()) <= 0:
            raise ValueError("every --pf-*-weight is 0: nothing to send")
        self.http = None
        if o.pf_api == "http":
            if any(self.weights[rpc] for rpc in ("GenerateImage", "Caption", "Score", "Embed")):
                raise ValueError("--pf-api http load-tests text requests only (stream and unary weights)")
            key = os.environ.get("PRUNEFUSION_API_KEY")
            # our own records and events, not the session's: it would count every request a second time
            self.http = FastHttpSession(o.pf_http_url, request_event=_Silent(), user=self,
                                        headers={"Authorization": f"Bearer {key}"} if key else None)
        # rendered before the run, not between requests: CPU work here would stall every greenlet's timestamps
        self.caption_pngs = [shapes_png(self.rng) for _ in range(16)] if o.pf_caption_weight > 0 else []

    def on_stop(self) -> None:
        self.api.close()

    def _request_options(self) -> GenerateOptions:
        # greedy: identical prompts give identical lengths; a request may end before max_new_tokens at EOS
        return GenerateOptions(max_new_tokens=self.opts.pf_max_new_tokens, cache_policy=self.opts.pf_cache,
                               temperature=0.0)

    def _http_body(self, prompt: str, stream: bool) -> dict:
        o = self.opts
        usage = {"stream_options": {"include_usage": True}} if stream else {}
        return {"model": o.pf_model, "prompt": prompt, "max_tokens": o.pf_max_new_tokens, "temperature": 0,
                "stream": stream, "cache": o.pf_cache, **usage}

    def _http_stream(self, prompt: str, t0: float):
        """SSE from /v1/completions: the first event with a choice is the first token (as the gRPC user counts the
        first chunk with token ids); the usage event at the end gives the token count."""
        reply = self.http.request("POST", "/v1/completions", json=self._http_body(prompt, True), stream=True)
        if reply.status_code != 200:
            raise HttpStatus(reply.status_code)
        times, tokens = _TokenTimes("http", t0), 0
        # line by line as each arrives: FastResponse.iter_content(n) blocks until n bytes are in (or the stream
        # ends), which held the first token back behind later ones and inflated TTFT. geventhttpclient's own
        # response (locust keeps it in `_response`) reads a line as soon as its separator is in.
        raw = reply._response
        while raw_line := raw.readline(b"\n"):  # b"" only at the end of the body (blank lines are b"\n")
            line = raw_line.decode("utf-8", errors="replace").strip()
            data = line.removeprefix("data: ")
            if not line.startswith("data: ") or data == "[DONE]":
                continue
            event = json.loads(data)
            if "error" in event:
                raise HttpStatus(500, event["error"].get("message", ""))
            if event.get("choices"):
                times.arrived()
            elif event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        return times.ttft, tokens, times.gaps

    def _http_unary(self, prompt: str, t0: float):
        reply = self.http.request("POST", "/v1/completions", json=self._http_body(prompt, False))
        if reply.status_code != 200:
            raise HttpStatus(reply.status_code)
        return None, json.loads(reply.content)["usage"]["completion_tokens"], []

    def _record(self, rpc: str, started: float, e2e: float, ttft: float | None, tokens: int, gaps: list[float],
                status: str, error: Exception | None) -> None:
        events.request.fire(request_type=self.opts.pf_api, name=rpc, response_time=e2e * 1000,
                            response_length=tokens, exception=error, context={"status": status})
        if _records is not None:
            model = {"GenerateImage": self.opts.pf_image_model, "Caption": self.opts.pf_image_model,
                     "Score": "QualityFilter", "Embed": self.opts.pf_embed_model}.get(rpc, self.opts.pf_model)
            _records.write(json.dumps({"rpc": rpc, "model": model, "start": started, "e2e": e2e, "ttft": ttft,
                                       "tokens": tokens, "itl": gaps, "status": status}) + "\n")

    def one_request(self) -> None:
        names = list(self.weights)
        rpc = self.rng.choices(names, weights=[self.weights[n] for n in names])[0]
        call = {"GenerateStream": self._stream, "Generate": self._unary, "GenerateImage": self._image,
                "Caption": self._caption, "Score": self._score, "Embed": self._embed}[rpc]
        if self.http is not None:
            call = {"GenerateStream": self._http_stream, "Generate": self._http_unary}[rpc]
        inputs = self._inputs(rpc)  # made before the clock starts
        started, t0 = time.time(), time.perf_counter()
        ttft, tokens, gaps, status, error = None, 0, [], "OK", None
        try:
            ttft, tokens, gaps = call(inputs, t0)
        except grpc.RpcError as err:
            status, error = err.code().name, err
        except HttpStatus as err:
            status, error = f"HTTP_{err.status}", err
        except Exception as err:  # noqa: BLE001 - a client-side failure is a counted error, not a lost request
            status, error = f"CLIENT_{type(err).__name__}", err
        except BaseException as err:  # GreenletExit: the run's stop timeout killed the request while it ran
            status, error = "CUT_OFF", err
            raise
        finally:
            self._record(rpc, started, time.perf_counter() - t0, ttft, tokens, gaps, status, error)

    def _inputs(self, rpc: str):
        if rpc == "Caption":
            return self.rng.choice(self.caption_pngs)
        if rpc == "GenerateImage":
            return shapes_prompt(self.rng)
        if rpc == "Score":  # documents of ~1 KB: lines of synthetic prose
            return score_request(["\n".join(synthetic_prompt(self.rng, 12) + "." for _ in range(12))
                                  for _ in range(self.opts.pf_score_docs)])
        if rpc == "Embed":
            return [synthetic_prompt(self.rng, self.opts.pf_prompt_words) for _ in range(self.opts.pf_embed_texts)]
        return synthetic_prompt(self.rng, self.opts.pf_prompt_words)

    def _stream(self, prompt: str, t0: float):
        times, tokens = _TokenTimes("grpc", t0), 0
        for chunk in self.api.generate_stream(prompt, self.opts.pf_model, self._request_options()):
            if chunk.token_ids:
                times.arrived()
                tokens += len(chunk.token_ids)
        return times.ttft, tokens, times.gaps

    def _unary(self, prompt: str, t0: float):
        return None, self.api.generate(prompt, self.opts.pf_model, self._request_options()).usage.completion_tokens, []

    def _image(self, prompt: str, t0: float):
        options = ImageOptions(steps=self.opts.pf_image_steps, seed=self.rng.getrandbits(32))
        self.api.generate_image(prompt, self.opts.pf_image_model, options)
        return None, 0, []

    def _score(self, request, t0: float):
        """`tokens` of a Score record count documents scored (so the report's throughput is documents/s)."""
        return None, len(self.api.score(request).results), []

    def _embed(self, texts: list[str], t0: float):
        """`tokens` of an Embed record count texts embedded (the report's throughput is texts/s)."""
        return None, len(self.api.embed(texts, self.opts.pf_embed_model).embeddings), []

    def _caption(self, png: bytes, t0: float):
        reply = self.api.caption(png, self.opts.pf_image_model)
        return None, len(reply.text.split()), []


class PrunefusionUser(_Calls):
    """One closed-loop user: sends the next request as soon as the previous one ends."""

    @task
    def request(self) -> None:
        self.one_request()


class PoissonArrivals(_Calls):
    """Open loop: requests start at Poisson times (rate --pf-rate per second), each in its own greenlet."""

    def on_start(self) -> None:
        super().on_start()
        self.in_flight = gevent.pool.Group()

    def on_stop(self) -> None:
        self.in_flight.join(timeout=60)  # let started requests finish and be recorded
        super().on_stop()

    def wait_time(self) -> float:  # locust waits this long after each task: exponential gaps = Poisson arrivals
        return self.rng.expovariate(self.opts.pf_rate)

    @task
    def arrival(self) -> None:
        self.in_flight.spawn(self.one_request)  # returns at once: the request runs while the next one is awaited
