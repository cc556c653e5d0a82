import asyncio
import threading
import time

import grpc
from conftest import ServerThread
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from prunefusion.server.config import parse_config


def test_health_reports_serving(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "prunefusion.v1.TextGeneration"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(server):
    with grpc.insecure_channel(server.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"prunefusion.v1.TextGeneration", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services


def test_open_watch_streams_do_not_hold_the_drain(pico_dir):
    """A client-side health checker's Watch stream never ends by itself; the drain ends it (after NOT_SERVING went
    out) instead of waiting drain_seconds for it."""
    config = parse_config({"server": {"host": "127.0.0.1", "port": 0, "metrics_port": None, "http_port": None,
                                      "drain_seconds": 30},
                           "cache": {"enabled": False}, "quality": {"enabled": False},
                           "models": [{"name": "p", "path": str(pico_dir)}]})
    thread = ServerThread(config).start()
    statuses, ended = [], threading.Event()
    channel = grpc.insecure_channel(thread.target)

    def follow():
        try:
            for update in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest()):
                statuses.append(update.status)
        finally:
            ended.set()

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    while not statuses:
        time.sleep(0.01)
    started = time.monotonic()
    asyncio.run_coroutine_threadsafe(thread.server.stop(delay=0.3), thread.loop).result(60)
    took = time.monotonic() - started
    channel.close()
    assert ended.wait(5)
    assert took < 5, f"the drain waited {took:.1f} s for a Watch stream"
    assert statuses == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
