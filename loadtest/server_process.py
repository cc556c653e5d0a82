"""`prunefusion serve` in its own process, for load tests and benchmarks: start, wait until SERVING, stop."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server started from a config file (None: the embedded default) on a free loopback port."""

    def __init__(self, config: Path | None, *, startup_timeout_s: float = 3600.0, log: Path | None = None,
                 connection=None) -> None:
        """`connection` (a prunefusion_client Connection): how to reach it, e.g. its TLS files; None: plaintext."""
        self.port, self.http_port = free_port(), free_port()
        self.connection = connection
        self.target = f"127.0.0.1:{self.port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"  # the OpenAI-compatible API (plaintext configs)
        command = [sys.executable, "-m", "prunefusion.cli", "serve", "--port", str(self.port),
                   "--http-port", str(self.http_port)]
        if config is not None:
            command += ["--config", str(config)]
        self.log_path = log
        self._log = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_serving(startup_timeout_s)
        except (RuntimeError, TimeoutError) as err:
            self.stop()
            raise type(err)(f"{err}{self._log_tail()}") from None
        except BaseException:
            self.stop()
            raise

    def _log_tail(self, lines: int = 20) -> str:
        """The end of the server's log, for an error that says why it did not start."""
        if self.log_path is None or not Path(self.log_path).is_file():
            return ""
        tail = Path(self.log_path).read_text(errors="replace").splitlines()[-lines:]
        return f"; the end of its log ({self.log_path}):\n" + "\n".join(tail)

    def _wait_serving(self, timeout_s: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from prunefusion_client import Connection

        deadline = time.monotonic() + timeout_s
        with (self.connection or Connection()).channel(self.target, []) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode} while starting")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"the server did not report SERVING within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the server drains and exits 0
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
