"""Locust users for prunefusion's gRPC API (`prunefusion loadtest` runs this headless; or run locust yourself):

    locust -f loadtest/locustfile.py --headless -u 4 -r 4 -t 30s --host localhost:50051 --pf-model tiny-lm

Imports only grpc, the stubs and the client: never torch or transformers (they break locust's gevent ssl patching).
Each call fires a locust request event (`Generate`, `GenerateStream`) and, on a stream's first non-empty chunk, a
separate `TTFT` event. With --pf-records, every request also appends one JSON line (wall-clock start, TTFT, e2e,
token count, inter-chunk gaps, status code) so percentiles are computed exactly, with warm-up excluded, afterwards.
"""

from __future__ import annotations

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any channel exists: gRPC's polling must yield to gevent

import itertools  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

import grpc  # noqa: E402
from locust import User, constant, events, task  # noqa: E402

from prunefusion_client import Client, GenerateOptions  # noqa: E402

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
    parser.add_argument("--pf-cache", default="bypass", choices=["default", "bypass", "refresh"])
    parser.add_argument("--pf-seed", type=int, default=0)
    parser.add_argument("--pf-records", default="", help="append one JSON line per request to this file")


@events.test_start.add_listener
def _open_records(environment, **_kwargs) -> None:
    global _records
    path = environment.parsed_options.pf_records
    _records = open(path, "a", buffering=1) if path else None  # noqa: SIM115 - closed at test_stop


@events.test_stop.add_listener
def _close_records(environment, **_kwargs) -> None:
    if _records is not None:
        _records.close()


def synthetic_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize()


class PrunefusionUser(User):
    """One closed-loop user: sends the next request as soon as the previous one ends."""

    wait_time = constant(0)

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.opts = o
        self.rng = random.Random(o.pf_seed * 1_000_003 + next(_user_ids))
        self.api = Client(self.host, max_attempts=1, timeout=300)  # no retries: a load test counts failures

    def on_stop(self) -> None:
        self.api.close()

    def _request_options(self) -> GenerateOptions:
        # greedy: identical prompts give identical lengths; a request may end before max_new_tokens at EOS
        return GenerateOptions(max_new_tokens=self.opts.pf_max_new_tokens, cache_policy=self.opts.pf_cache,
                               temperature=0.0)

    def _record(self, rpc: str, started: float, e2e: float, ttft: float | None, tokens: int, gaps: list[float],
                status: str, error: Exception | None) -> None:
        events.request.fire(request_type="grpc", name=rpc, response_time=e2e * 1000, response_length=tokens,
                            exception=error, context={"status": status})
        if _records is not None:
            _records.write(json.dumps({"rpc": rpc, "model": self.opts.pf_model, "start": started, "e2e": e2e,
                                       "ttft": ttft, "tokens": tokens, "itl": gaps, "status": status}) + "\n")

    @task
    def generate(self) -> None:
        o = self.opts
        stream = self.rng.random() * (o.pf_stream_weight + o.pf_unary_weight) < o.pf_stream_weight
        prompt = synthetic_prompt(self.rng, o.pf_prompt_words)
        started, t0 = time.time(), time.perf_counter()
        ttft, tokens, gaps, last, status, error = None, 0, [], None, "OK", None
        try:
            if stream:
                for chunk in self.api.generate_stream(prompt, o.pf_model, self._request_options()):
                    now = time.perf_counter()
                    if chunk.token_ids:
                        if ttft is None:
                            ttft = now - t0
                            events.request.fire(request_type="grpc", name="TTFT", response_time=ttft * 1000,
                                                response_length=0, exception=None, context={})
                        else:
                            gaps.append(now - last)
                        last = now
                        tokens += len(chunk.token_ids)
            else:
                reply = self.api.generate(prompt, o.pf_model, self._request_options())
                tokens = reply.usage.completion_tokens
        except grpc.RpcError as err:
            status, error = err.code().name, err
        self._record("GenerateStream" if stream else "Generate", started, time.perf_counter() - t0, ttft, tokens,
                     gaps, status, error)
