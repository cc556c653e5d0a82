"""TLS and mutual TLS for the gRPC port, with certificates re-read when their files change.

gRPC's dynamic SSL credentials ask `CertificateFiles.fetch` at every new connection's handshake; it answers None
(no change) unless a file's stat changed, and a new pair is used only once the key matches the certificate (a
rotation caught half-written keeps the old pair, once, and is tried again when the files next change).
"""

from __future__ import annotations

import logging
import ssl
import threading

import grpc

from prunefusion.home import expand_path
from prunefusion.server.auth.keys import file_signature
from prunefusion.server.config import TlsConfig

log = logging.getLogger(__name__)


class CertificateFiles:
    def __init__(self, cfg: TlsConfig):
        self.paths = [expand_path(p) for p in (cfg.cert_file, cfg.key_file, cfg.client_ca_file) if p]
        self._lock = threading.Lock()
        self._seen = self._signature()
        self.initial = self._configuration(strict=True)

    def _signature(self) -> tuple:
        return tuple(file_signature(p) for p in self.paths)

    def _configuration(self, strict: bool) -> grpc.ServerCertificateConfiguration | None:
        cert, key, *ca = self.paths
        try:
            pair = (key.read_bytes(), cert.read_bytes())
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)  # the pair must match
            if (key.read_bytes(), cert.read_bytes()) != pair:  # changed while checked: what was checked is not used
                raise OSError(0, "the files changed while being read")
            ca_pem = ca[0].read_bytes() if ca else None
            if ca_pem is not None:
                ssl.create_default_context(cadata=ca_pem.decode("ascii", "replace"))  # a CA file that parses
        except (OSError, ssl.SSLError, ValueError) as err:
            if strict:
                raise ValueError(f"server.tls: cannot use {cert} with {key}"
                                 f"{f' and {ca[0]}' if ca else ''}: {err}") from None
            log.warning("tls: the certificate files changed but cannot be used (%s); keeping the previous ones until "
                        "they change again", err)
            return None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca_pem)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake: a new configuration when the files changed, else None."""
        with self._lock:
            signature = self._signature()
            if signature == self._seen:
                return None
            config = self._configuration(strict=False)
            self._seen = signature  # a failed state is not retried (nor warned about) at every handshake
            if config is not None:
                log.info("tls: certificate files reloaded (%s)", ", ".join(str(p) for p in self.paths))
            return config


def server_credentials(cfg: TlsConfig) -> grpc.ServerCredentials:
    files = CertificateFiles(cfg)
    return grpc.dynamic_ssl_server_credentials(files.initial, files.fetch,
                                               require_client_authentication=cfg.client_ca_file is not None)


def peer_identity(context: grpc.aio.ServicerContext) -> str:
    """The client certificate's subject (mutual TLS), or "-"."""
    subject = context.auth_context().get("x509_subject")
    return subject[0].decode("utf-8", "replace") if subject else "-"
