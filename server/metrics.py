"""Prometheus metrics (vLLM-style names), served on the HTTP metrics port (`server.metrics_port`).

Module-level objects: one set per process, labelled by model, as Prometheus expects.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

# engine
MODEL_RUNS = Counter("prunefusion_model_runs_total", "Requests admitted to an engine (model executions)", ["model"])
TIME_TO_FIRST_TOKEN = Histogram("prunefusion_time_to_first_token_seconds", "Arrival to first token", ["model"],
                                buckets=LATENCY_BUCKETS)
INTER_TOKEN_LATENCY = Histogram("prunefusion_inter_token_latency_seconds", "Gap between streamed chunks", ["model"],
                                buckets=LATENCY_BUCKETS)
E2E_LATENCY = Histogram("prunefusion_e2e_request_latency_seconds", "Arrival to last token", ["model"],
                        buckets=LATENCY_BUCKETS)
QUEUE_TIME = Histogram("prunefusion_request_queue_time_seconds", "Arrival to prefill", ["model"],
                       buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("prunefusion_batch_size", "Rows per decode step", ["model"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
REQUESTS_RUNNING = Gauge("prunefusion_num_requests_running", "Rows in the running batch", ["model"])
REQUESTS_WAITING = Gauge("prunefusion_num_requests_waiting", "Requests in the admission queue", ["model"])
PROMPT_TOKENS = Counter("prunefusion_prompt_tokens_total", "Prompt tokens by source (computed: prefilled by the model; "
                        "prefix_cache: keys and values reused from the torch engine's prefix cache)",
                        ["model", "source"])
FINISHED = Counter("prunefusion_requests_finished_total", "Finished requests by reason", ["model", "reason"])

# response cache
CACHE_LOOKUPS = Counter("prunefusion_cache_lookups_total", "Cache lookups by result (hit, miss, bypass, "
                        "uncacheable, shared: served by an identical in-flight request)", ["result"])
CACHE_ERRORS = Counter("prunefusion_cache_errors_total", "Redis operations that failed or timed out", ["operation"])
CACHE_LOOKUP_LATENCY = Histogram("prunefusion_cache_lookup_seconds", "Redis GET latency", buckets=FAST_BUCKETS)
CACHE_STORES = Counter("prunefusion_cache_stores_total", "Entries written", [])
CACHE_SKIPPED = Counter("prunefusion_cache_store_skipped_total", "Results not stored, by reason", ["reason"])

# API keys (server/auth): the key's name, never the key; "-" for calls without a valid key
API_REQUESTS = Counter("prunefusion_api_requests_total", "Calls checked by API key, by key name and result (ok, "
                       "unauthenticated, rate_limited, concurrency_limited, permission_denied)", ["key", "result"])

# requests refused before any work (server/guard.py): too_large, undecodable, string_bounds
REQUESTS_REJECTED = Counter("prunefusion_requests_rejected_total", "Requests refused as INVALID_ARGUMENT before "
                            "parsing or any work, by reason", ["reason"])


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass


def _require_bearer(app, allowed: Callable[[str | None], bool]):
    def guarded(environ, start_response):
        if allowed(environ.get("HTTP_AUTHORIZATION")):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("WWW-Authenticate", "Bearer"), ("Content-Type", "text/plain")])
        return [b"missing or invalid API key\n"]

    return guarded


def start_metrics_server(host: str, port: int,
                         allowed: Callable[[str | None], bool] | None = None) -> tuple[ThreadingWSGIServer,
                                                                                        threading.Thread]:
    """Serve /metrics over HTTP; port 0 picks a free one (read it from the returned server). `allowed` (given the
    Authorization header) guards it with API keys."""
    app = make_wsgi_app() if allowed is None else _require_bearer(make_wsgi_app(), allowed)
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # "::" and IPv6 addresses too
    server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    httpd = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True, name="metrics")
    thread.start()
    return httpd, thread
