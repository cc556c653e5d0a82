"""deploy/check.sh's probes, run on the host with the checkout's .venv (grpc health, the client, Prometheus' API).

    probe.py free PORT...                                      fail when something listens on 127.0.0.1:PORT
    probe.py wait TARGET [--timeout S] [--container NAME]      until grpc.health.v1 says SERVING
    probe.py generate TARGET MODEL [--expect-cache-hit]        one greedy Generate (twice with --expect-cache-hit)
    probe.py prometheus URL --job JOB --query EXPR [--timeout S]   target up, then EXPR returns a value > 0
    probe.py openai URL MODEL                                  /ready, /v1/models, then a greedy /v1/completions
                                                               whose tokens equal gRPC Generate's (--grpc TARGET)
Every failure exits 1 with a line saying what was expected and what came back.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def fail(message: str) -> None:
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def free(args: argparse.Namespace) -> None:
    for port in args.ports:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                fail(f"127.0.0.1:{port} is in use (a stale container? `docker ps`)")
    print(f"ports free: {' '.join(map(str, args.ports))}")


def container_running(name: str) -> bool:
    state = subprocess.run(["docker", "inspect", "--format", "{{.State.Running}}", name], capture_output=True,
                           text=True)
    return state.stdout.strip() == "true"


def wait(args: argparse.Namespace) -> None:
    start, last = time.monotonic(), "no answer"
    with grpc.insecure_channel(args.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() - start < args.timeout:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    print(f"{args.target}: SERVING after {time.monotonic() - start:.1f} s")
                    return
            except grpc.RpcError as err:
                last = err.code().name
            if args.container and not container_running(args.container):
                fail(f"container {args.container} stopped before {args.target} was SERVING (last: {last})")
            time.sleep(0.5)
    fail(f"{args.target} not SERVING within {args.timeout:.0f} s (last: {last})")


def generate(args: argparse.Namespace) -> None:
    from prunefusion_client import Client, GenerateOptions
    from prunefusion_client.v1 import text_generation_pb2 as pb

    options = GenerateOptions(max_new_tokens=8, temperature=0.0)  # greedy: deterministic, so cacheable
    with Client(args.target, timeout=60) as client:
        replies = [client.generate(args.prompt, args.model, options) for _ in range(2 if args.expect_cache_hit else 1)]
    for i, reply in enumerate(replies, 1):
        source = pb.CacheSource.Name(reply.cache_source)
        print(f"generate {i}: {reply.usage.completion_tokens} tokens {reply.text!r} cached={reply.cached} "
              f"({source}), {reply.timings.total_seconds * 1000:.1f} ms")
        if not reply.token_ids:
            fail("Generate returned no tokens")
    if args.expect_cache_hit:
        first, second = replies
        if not second.cached or second.cache_source != pb.CACHE_SOURCE_STORED:
            fail(f"the second identical greedy Generate was not a stored cache hit (cached={second.cached}, "
                 f"{pb.CacheSource.Name(second.cache_source)})")
        if list(second.token_ids) != list(first.token_ids):
            fail("the cache hit's tokens differ from the model run's")


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as reply:  # loopback only
        return json.load(reply)


def prometheus(args: argparse.Namespace) -> None:
    start, last = time.monotonic(), "no answer"
    base = args.url.rstrip("/")
    while time.monotonic() - start < args.timeout:
        try:
            targets = [t for t in _get(f"{base}/api/v1/targets")["data"]["activeTargets"]
                       if t["labels"].get("job") == args.job]
            last = ", ".join(f"{t['scrapeUrl']} {t['health']} {t.get('lastError', '')}".strip() for t in targets)
            if targets and all(t["health"] == "up" for t in targets):
                result = _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": args.query}))
                values = [float(r["value"][1]) for r in result["data"]["result"]]
                last += f"; {args.query} = {values}"
                if values and max(values) > 0:
                    print(f"prometheus: job {args.job} up ({targets[0]['scrapeUrl']}), {args.query} = "
                          f"{max(values):g} after {time.monotonic() - start:.1f} s")
                    return
        except OSError as err:
            last = str(err)
        time.sleep(1)
    fail(f"prometheus at {base}: job {args.job} not up with {args.query} > 0 within {args.timeout:.0f} s "
         f"(last: {last})")


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:  # loopback only
        return json.load(reply)


def openai(args: argparse.Namespace) -> None:
    """The OpenAI-compatible HTTP API of the container: ready, lists the model, and answers a greedy completion with
    the text gRPC's Generate gives for the same request."""
    from prunefusion_client import Client, GenerateOptions

    base = args.url.rstrip("/")
    try:
        ready = _get(f"{base}/ready")
        listed = [m["id"] for m in _get(f"{base}/v1/models")["data"]]
        reply = _post(f"{base}/v1/completions", {"model": args.model, "prompt": args.prompt, "max_tokens": 8,
                                                 "temperature": 0, "cache": "bypass"})
    except OSError as err:
        fail(f"{base}: {err}")
    if args.model not in listed:
        fail(f"{base}/v1/models lists {listed}, not {args.model}")
    text = reply["choices"][0]["text"]
    print(f"openai: /ready {ready}, /v1/models {listed}, /v1/completions {reply['usage']['completion_tokens']} "
          f"tokens {text!r}")
    if args.grpc:
        with Client(args.grpc, timeout=60) as client:
            want = client.generate(args.prompt, args.model, GenerateOptions(max_new_tokens=8, temperature=0.0,
                                                                            cache_policy="bypass")).text
        if text != want:
            fail(f"HTTP completion {text!r} differs from gRPC Generate's {want!r}")
        print("openai: the same text as gRPC Generate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("free")
    p.add_argument("ports", type=int, nargs="+")
    p.set_defaults(func=free)
    p = sub.add_parser("wait")
    p.add_argument("target")
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--container", help="fail at once when this container stops")
    p.set_defaults(func=wait)
    p = sub.add_parser("generate")
    p.add_argument("target")
    p.add_argument("model")
    p.add_argument("--prompt", default="def main():")
    p.add_argument("--expect-cache-hit", action="store_true", help="send it twice; the second must be a cache hit")
    p.set_defaults(func=generate)
    p = sub.add_parser("prometheus")
    p.add_argument("url")
    p.add_argument("--job", required=True)
    p.add_argument("--query", required=True)
    p.add_argument("--timeout", type=float, default=60)
    p.set_defaults(func=prometheus)
    p = sub.add_parser("openai")
    p.add_argument("url", help="the HTTP API's base URL, e.g. http://127.0.0.1:56080")
    p.add_argument("model")
    p.add_argument("--prompt", default="def main():")
    p.add_argument("--grpc", help="host:port: also check the text against gRPC Generate's")
    p.set_defaults(func=openai)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
