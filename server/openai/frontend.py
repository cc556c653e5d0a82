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

import uvicorn

from prunefusion.home import expand_path
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
    def __init__(self, app, host: str, port: int, *, tls: TlsConfig | None, graceful_seconds: float):
        self._config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, ws="none",
                                      timeout_graceful_shutdown=graceful_seconds, timeout_keep_alive=30,
                                      **tls_options(tls))
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
