"""How a client reaches a server: an API key (sent as `authorization: Bearer KEY` on every call) and TLS files.

    Connection(api_key="pf-...", tls_ca="ca.pem")                 # TLS, the server checked against ca.pem
    Connection(tls_ca="ca.pem", tls_cert="me.pem", tls_key="me-key.pem")   # mutual TLS
    Connection()                                                  # the key from $PRUNEFUSION_API_KEY, plaintext

CLIs share `add_arguments` / `from_args` so that every command takes the same flags.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

API_KEY_ENV = "PRUNEFUSION_API_KEY"
TARGET_SCHEMES = ("ipv4:", "ipv6:", "dns:", "unix:", "unix-abstract:", "vsock:")  # gRPC name syntax: as given


def _read(path: str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


@dataclass(frozen=True)
class Connection:
    api_key: str | None = None  # None: $PRUNEFUSION_API_KEY (unset: no key)
    tls_ca: str | None = None  # PEM roots the server's certificate must chain to (TLS on; None + tls_cert: system)
    tls_cert: str | None = None  # client certificate for mutual TLS ...
    tls_key: str | None = None  # ... and its private key
    server_name: str | None = None  # the name to check the server's certificate against (default: the target host)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (a client certificate and its private key)")

    @property
    def key(self) -> str | None:
        return self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV) or None

    @property
    def uses_tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.uses_tls:
            return None
        return grpc.ssl_channel_credentials(_read(self.tls_ca), _read(self.tls_key), _read(self.tls_cert))

    def options(self) -> list[tuple[str, object]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.key}"),) if self.key else ()

    def channel(self, target: str, options: list, credentials: grpc.ChannelCredentials | None = None):
        """A blocking channel (`credentials` given: used instead of the TLS files)."""
        credentials = credentials or self.credentials()
        opts = [*options, *self.options()]
        channel = grpc.secure_channel(target, credentials, opts) if credentials else grpc.insecure_channel(target, opts)
        metadata = self.metadata()
        return grpc.intercept_channel(channel, _AddMetadata(metadata)) if metadata else channel

    def aio_channel(self, target: str, options: list, credentials: grpc.ChannelCredentials | None = None):
        credentials = credentials or self.credentials()
        opts = [*options, *self.options()]
        metadata = self.metadata()
        interceptors = [cls(metadata) for cls in _AIO_INTERCEPTORS] if metadata else None
        if credentials:
            return grpc.aio.secure_channel(target, credentials, opts, interceptors=interceptors)
        return grpc.aio.insecure_channel(target, opts, interceptors=interceptors)


def channel_target(target: str | Sequence[str]) -> str:
    """A gRPC target: a string as given (`host:port`, `dns:///name:port`, `ipv4:a:p,b:p`), or several `IP:PORT`
    addresses (a list, or a string with commas and no scheme) as one `ipv4:` / `ipv6:` target the channel balances
    over. A host name among several is refused: `dns:///NAME:PORT` resolves one name to all its addresses."""
    if isinstance(target, str):
        if "," not in target or target.startswith(TARGET_SCHEMES):
            return target
        target = target.split(",")
    addresses = list(target)
    scheme = "ipv6" if all(a.strip().startswith("[") for a in addresses) else "ipv4"
    for address in addresses:
        host = address.strip().rsplit(":", 1)[0].strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"target: {address!r} is not an IP:PORT; several replicas are IP addresses (ipv4:A:PORT,"
                             "B:PORT) or one name that resolves to all of them (dns:///NAME:PORT)") from None
    return f"{scheme}:" + ",".join(a.strip() for a in addresses)


def add_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """--api-key, --tls-ca, --tls-cert, --tls-key, --server-name (`prefix` e.g. "pf-" for locust's options)."""
    group = parser.add_argument_group("connection")
    group.add_argument(f"--{prefix}api-key", help=f"API key (default: ${API_KEY_ENV})")
    group.add_argument(f"--{prefix}tls-ca", help="PEM CA bundle to verify the server with (turns TLS on)")
    group.add_argument(f"--{prefix}tls-cert", help="client certificate (PEM) for mutual TLS")
    group.add_argument(f"--{prefix}tls-key", help="the client certificate's private key (PEM)")
    group.add_argument(f"--{prefix}server-name", help="name the server's certificate must carry (default: the host)")


def from_args(args: argparse.Namespace, prefix: str = "") -> Connection:
    attr = prefix.replace("-", "_")
    return Connection(**{name: getattr(args, attr + name) for name in
                         ("api_key", "tls_ca", "tls_cert", "tls_key", "server_name")})


def as_arguments(connection: Connection, prefix: str = "") -> list[str]:
    """The flags that give a child process the same connection (the key stays in the environment, not argv)."""
    flags = {"tls-ca": connection.tls_ca, "tls-cert": connection.tls_cert, "tls-key": connection.tls_key,
             "server-name": connection.server_name}
    return [item for name, value in flags.items() if value is not None for item in (f"--{prefix}{name}", value)]


def child_environment(connection: Connection) -> dict[str, str]:
    """This process's environment with the connection's key in $PRUNEFUSION_API_KEY (for a child's argv-less key)."""
    key = connection.key
    return {**os.environ, **({API_KEY_ENV: key} if key else {})}


def _merged(existing, metadata) -> tuple:
    """The call's metadata with ours in place of any entry of the same name (one `authorization`, never two)."""
    ours = {k for k, _ in metadata}
    return (*(m for m in existing or () if m[0] not in ours), *metadata)


class _Details(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method, self.timeout, self.credentials = details.method, details.timeout, details.credentials
        self.wait_for_ready, self.compression = details.wait_for_ready, details.compression
        self.metadata = _merged(details.metadata, metadata)


class _AddMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, metadata):
        self._metadata = metadata

    def _call(self, continuation, details, request):
        return continuation(_Details(details, self._metadata), request)

    intercept_unary_unary = intercept_unary_stream = intercept_stream_unary = intercept_stream_stream = _call


class _AioAddMetadata:
    def __init__(self, metadata):
        self._metadata = metadata

    async def _call(self, continuation, details, request):
        return await continuation(details._replace(metadata=_merged(details.metadata, self._metadata)), request)


_AIO_INTERCEPTORS = tuple(type(f"_Aio{kind}", (_AioAddMetadata, base), {f"intercept_{name}": _AioAddMetadata._call})
                          for kind, base, name in (
                              ("UnaryUnary", grpc.aio.UnaryUnaryClientInterceptor, "unary_unary"),
                              ("UnaryStream", grpc.aio.UnaryStreamClientInterceptor, "unary_stream"),
                              ("StreamUnary", grpc.aio.StreamUnaryClientInterceptor, "stream_unary"),
                              ("StreamStream", grpc.aio.StreamStreamClientInterceptor, "stream_stream")))
