"""uvicorn on the server's own event loop, started and drained with the gRPC server.

uvicorn's `Server.serve` would install its own SIGTERM/SIGINT handlers; the app already owns those (drain), so the
front end drives uvicorn's startup, main loop and shutdown itself. Drain: /ready says 503 from the moment the
server's health is NOT_SERVING (the app's), the port keeps serving through the drain delay, then stops accepting;
requests and streams in flight get the drain time, after which the engines end what is left (a stream's last
chunk says `finish_reason: "abort"`), and the flush time lets it go out.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import uvicorn

from prunefusion.home import expand_path
from prunefusion.server.auth.interceptor import access_log
from prunefusion.server.config import ConfigError, TlsConfig

log = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the listening socket
    # says TCP, and without it Nagle holds a stream's first event behind the unacknowledged headers until the
    # client's delayed ACK (~40 ms on Linux): TTFT over HTTP was 45 ms above gRPC's
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"could not bind the HTTP port {host}:{port}: {err.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class AccessLog:
    """server.access_log over HTTP: one INFO line per request on the gRPC port's logger, when its response has
    ended (a stream's last event): method and path, API key name (routes.admit records it), peer, status, time."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), ["-"]

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            client = scope.get("client")
            access_log.info("%s %s key=%s peer=%s status=%s %.1fms", scope["method"], scope["path"],
                            scope.get("state", {}).get("key_name", "-"),
                            f"{client[0]}:{client[1]}" if client else "-", status[0],
                            (time.perf_counter() - started) * 1e3)


def tls_options(tls: TlsConfig | None) -> dict:
    """uvicorn's TLS settings for server.tls: the gRPC port's certificate, and its client CA for mutual TLS."""
    if tls is None:
        return {}
    import ssl

    options = {"ssl_certfile": str(expand_path(tls.cert_file)), "ssl_keyfile": str(expand_path(tls.key_file))}
    if tls.client_ca_file:
        required = tls.require_client_auth is not False
        options.update(ssl_ca_certs=str(expand_path(tls.client_ca_file)),
                       ssl_cert_reqs=ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL)
    return options


class HttpFrontend:
    def __init__(self, app, host: str, port: int, *, tls: TlsConfig | None, graceful_seconds: float,
                 access_log_on: bool = False):
        self._config = uvicorn.Config(AccessLog(app) if access_log_on else app, lifespan="off", log_config=None,
                                      access_log=False, ws="none", timeout_graceful_shutdown=graceful_seconds,
                                      timeout_keep_alive=30, **tls_options(tls))
        self._host, self._port = host, port
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._main: asyncio.Task | None = None
        self.port: int | None = None
        self.scheme = "https" if tls else "http"

    async def start(self) -> None:
        self._socket = bind_socket(self._host, self._port)
        self.port = self._socket.getsockname()[1]
        try:
            self._config.load()
        except (OSError, ValueError) as err:  # unreadable certificate files
            self._socket.close()
            raise ConfigError(f"server.tls for the HTTP port: {err}") from None
        self._server = uvicorn.Server(self._config)
        # what Server._serve does before startup (lifespan "off": a no-op object)
        self._server.lifespan = self._config.lifespan_class(self._config)
        await self._server.startup(sockets=[self._socket])
        self._main = asyncio.create_task(self._server.main_loop())

    async def stop(self) -> None:
        """Stop accepting, wait for the requests in flight (at most graceful_seconds), close."""
        if self._server is None:
            return
        self._server.should_exit = True
        await self._main
        await self._server.shutdown(sockets=[self._socket])
        self._server = None
