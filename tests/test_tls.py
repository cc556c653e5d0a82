"""TLS and mutual TLS over real sockets with certificates made in the test (trustme), certificate rotation without a
restart, the plaintext health-only port, and the client's TLS flags."""

from __future__ import annotations

import logging
import os
import time

import grpc
import pytest
import trustme
from conftest import ServerThread
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prunefusion.server.config import parse_config
from prunefusion_client import Client, GenerateOptions
from prunefusion_client.v1 import text_generation_pb2 as pb
from prunefusion_client.v1 import text_generation_pb2_grpc as pb_grpc


def write_server_cert(ca: trustme.CA, folder):
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(folder / "server-key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))


def write_client_cert(ca: trustme.CA, folder, name: str) -> tuple[str, str]:
    cert = ca.issue_cert(f"{name}@example.org", common_name=name)
    paths = str(folder / f"{name}.pem"), str(folder / f"{name}-key.pem")
    cert.cert_chain_pems[0].write_to_path(paths[0])
    cert.private_key_pem.write_to_path(paths[1])
    return paths


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    other.cert_pem.write_to_path(str(folder / "other-ca.pem"))
    write_server_cert(ca, folder)
    return folder, ca, other


def tls_server(pico_dir, folder, **tls):
    config = parse_config({
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": None, "http_port": None, "health_port": 0,
                   "access_log": True,
                   "tls": {"cert_file": str(folder / "server.pem"), "key_file": str(folder / "server-key.pem"),
                           **tls}},
        "cache": {"enabled": False}, "quality": {"enabled": False},
        "models": [{"name": "pico", "path": str(pico_dir), "default_max_new_tokens": 2}],
    })
    return ServerThread(config).start()


def list_models(target: str, **security) -> list[str]:
    with Client(target, max_attempts=1, timeout=10, **security) as client:
        return [m.name for m in client.list_models()]


def test_tls_serves_a_trusting_client_and_refuses_plaintext(pico_dir, pki):
    folder, _, _ = pki
    server = tls_server(pico_dir, folder)
    try:
        assert list_models(server.target, tls_ca=str(folder / "ca.pem")) == ["pico"]
        assert list_models(f"localhost:{server.server.port}", tls_ca=str(folder / "ca.pem")) == ["pico"]
        for security in ({}, {"tls_ca": str(folder / "other-ca.pem")}):  # plaintext; a server it cannot verify
            with pytest.raises(grpc.RpcError) as err:
                list_models(server.target, **security)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # the health-only port: plaintext, health and nothing else
        with grpc.insecure_channel(f"127.0.0.1:{server.server.health_port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.TextGenerationStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop()


def test_mutual_tls_checks_the_client_and_logs_its_subject(pico_dir, pki, caplog):
    folder, ca, other = pki
    good = write_client_cert(ca, folder, "app-one")
    stranger = write_client_cert(other, folder, "stranger")
    server = tls_server(pico_dir, folder, client_ca_file=str(folder / "ca.pem"))
    ca_file = str(folder / "ca.pem")
    try:
        with caplog.at_level(logging.INFO, logger="prunefusion.server.access"):
            assert list_models(server.target, tls_ca=ca_file, tls_cert=good[0], tls_key=good[1]) == ["pico"]
        assert any("client_cert=" in r.getMessage() and "CN=app-one" in r.getMessage() for r in caplog.records)
        for security in ({"tls_ca": ca_file}, {"tls_ca": ca_file, "tls_cert": stranger[0], "tls_key": stranger[1]}):
            with pytest.raises(grpc.RpcError) as err:  # no client certificate; one from another CA
                list_models(server.target, **security)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_a_rotated_certificate_reaches_new_connections_without_a_restart(pico_dir, tmp_path):
    old_ca, new_ca = trustme.CA(), trustme.CA()
    old_ca.cert_pem.write_to_path(str(tmp_path / "old-ca.pem"))
    new_ca.cert_pem.write_to_path(str(tmp_path / "new-ca.pem"))
    write_server_cert(old_ca, tmp_path)
    server = tls_server(pico_dir, tmp_path)
    try:
        assert list_models(server.target, tls_ca=str(tmp_path / "old-ca.pem")) == ["pico"]
        (tmp_path / "server.pem").write_bytes(b"half-written")  # a rotation caught midway keeps the old pair
        assert list_models(server.target, tls_ca=str(tmp_path / "old-ca.pem")) == ["pico"]
        write_server_cert(new_ca, tmp_path)
        future = time.time() + 5  # a new mtime even on a coarse clock
        for name in ("server.pem", "server-key.pem"):
            os.utime(tmp_path / name, (future, future))
        assert list_models(server.target, tls_ca=str(tmp_path / "new-ca.pem")) == ["pico"]
        with pytest.raises(grpc.RpcError):
            list_models(server.target, tls_ca=str(tmp_path / "old-ca.pem"))
    finally:
        server.stop()


def test_bad_tls_files_stop_the_start_naming_them(pico_dir, tmp_path, pki):
    from prunefusion.server.config import ConfigError

    folder, _, _ = pki
    (tmp_path / "server.pem").write_bytes((folder / "server.pem").read_bytes())
    (tmp_path / "server-key.pem").write_bytes(trustme.CA().issue_cert("x").private_key_pem.bytes())  # not its key
    with pytest.raises(ConfigError, match="server.tls: cannot use .*server.pem"):
        tls_server(pico_dir, tmp_path)
    for tls, problem in (({"require_client_auth": True}, "require_client_auth needs client_ca_file"),
                         ({"require_client_auth": False, "client_ca_file": "ca.pem"}, "optional client certificate")):
        with pytest.raises(ConfigError, match=problem):
            parse_config({"server": {"tls": {"cert_file": "a", "key_file": "b", **tls}},
                          "models": [{"name": "m", "path": "/x"}]})
    (tmp_path / "server-key.pem").write_bytes((folder / "server-key.pem").read_bytes())
    (tmp_path / "ca.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="server.tls: cannot use .*ca.pem"):
        tls_server(pico_dir, tmp_path, client_ca_file=str(tmp_path / "ca.pem"))


def test_client_cli_with_tls_and_a_key(pico_dir, pki, tmp_path, capsys):
    from prunefusion.server.auth.keys import hash_key
    from prunefusion_client.cli import main as client_main

    folder, ca, _ = pki
    keys = tmp_path / "keys.txt"
    keys.write_text(f"cli sha256:{hash_key('pf-cli-key').hex()}\n")
    config = parse_config({
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": None, "http_port": None,
                   "tls": {"cert_file": str(folder / "server.pem"), "key_file": str(folder / "server-key.pem")},
                   "auth": {"api_keys_file": str(keys)}},
        "cache": {"enabled": False}, "quality": {"enabled": False},
        "models": [{"name": "pico", "path": str(pico_dir)}],
    })
    server = ServerThread(config).start()
    try:
        base = ["--target", f"localhost:{server.server.port}", "--tls-ca", str(folder / "ca.pem")]
        assert client_main([*base, "--api-key", "pf-cli-key", "generate", "a", "--max-new-tokens", "2"]) == 0
        assert client_main([*base, "--api-key", "pf-cli-kez", "models"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        # --server-name: dial by IP, check the certificate's DNS name
        assert client_main(["--target", server.target, "--tls-ca", str(folder / "ca.pem"), "--server-name",
                            "localhost", "--api-key", "pf-cli-key", "models"]) == 0
        with Client(server.target, tls_ca=str(folder / "ca.pem"), api_key="pf-cli-key", max_attempts=1) as client:
            assert client.generate("a", options=GenerateOptions(max_new_tokens=1)).usage.completion_tokens == 1
    finally:
        server.stop()


def test_a_tls_server_process_is_waited_for_over_tls(pico_dir, pki, tmp_path):
    """`prunefusion loadtest --serve CONFIG --tls-ca ...`: the start-up health check dials with the same TLS files."""
    from prunefusion.loadtest.server_process import ServerProcess
    from prunefusion_client import Connection

    folder, _, _ = pki
    config = tmp_path / "server.yaml"
    config.write_text(f"server: {{host: 127.0.0.1, metrics_port: null, http_port: null, "
                      f"tls: {{cert_file: '{folder / 'server.pem'}', "
                      f"key_file: '{folder / 'server-key.pem'}'}}}}\ncache: {{enabled: false}}\n"
                      f"quality: {{enabled: false}}\nmodels:\n  - name: pico\n    path: '{pico_dir}'\n")
    connection = Connection(tls_ca=str(folder / "ca.pem"))
    with ServerProcess(config, startup_timeout_s=120, log=tmp_path / "server.log", connection=connection) as server:
        assert list_models(server.target, tls_ca=str(folder / "ca.pem")) == ["pico"]
    with pytest.raises(TimeoutError, match="did not report SERVING"):  # plaintext cannot see it come up
        ServerProcess(config, startup_timeout_s=8, log=tmp_path / "plain.log")
