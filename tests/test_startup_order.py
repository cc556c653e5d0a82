"""Models serve as soon as each is ready: health per service while the others build, and `serve --no-build`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import grpc
import pytest
from conftest import ServerThread
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prunefusion.server import app
from prunefusion.server.config import parse_config
from prunefusion_client import Client, GenerateOptions, ImageOptions

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
TEXT, MULTIMODAL = "prunefusion.v1.TextGeneration", "prunefusion.v1.Multimodal"


def statuses(target: str) -> dict[str, int]:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        check = stub.Check
        return {s: check(health_pb2.HealthCheckRequest(service=s), timeout=5).status for s in ("", TEXT, MULTIMODAL)}


def wait_for(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_text_serves_while_the_image_model_builds_and_built_models_load_first(tmp_path, monkeypatch, pico_dir,
                                                                            transfusion_dir):
    """The image model's directory is missing and comes first in the config; its build is held until the test lets
    it go. Meanwhile the text model (already built) loads and answers, TextGeneration is SERVING, Multimodal and the
    overall status are not, and an image call is UNAVAILABLE saying the model is being built."""
    release, building = threading.Event(), threading.Event()

    def held_build(cfg):  # stands in for the minutes a real build takes; then puts a real model in place
        if app.is_built(cfg):
            return
        building.set()
        assert release.wait(60)
        shutil.copytree(transfusion_dir, cfg.resolved_path)

    monkeypatch.setattr(app, "build_missing", held_build)
    config = parse_config({
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": None, "http_port": None},
        "cache": {"enabled": False},
        "models": [
            {"name": "tf", "path": str(tmp_path / "tf"), "engine": "transfusion", "build": "transfusion",
             "images": {"default_steps": 2}},
            {"name": "lm", "path": str(pico_dir)},
        ],
    })
    server = ServerThread(config).begin()
    try:
        assert building.wait(60), "the missing model's build never started"
        wait_for(lambda: statuses(server.target)[TEXT] == SERVING)
        assert statuses(server.target) == {"": NOT_SERVING, TEXT: SERVING, MULTIMODAL: NOT_SERVING}
        with Client(server.target, max_attempts=1, timeout=30) as client:
            assert client.generate("The os module", "lm", GenerateOptions(max_new_tokens=4)).usage.completion_tokens
            with pytest.raises(grpc.RpcError) as err:
                client.generate_image("a red circle", "tf", ImageOptions(steps=2))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "not ready yet (building 'transfusion')" in err.value.details()
            release.set()
            server.wait_started()
            assert statuses(server.target) == {"": SERVING, TEXT: SERVING, MULTIMODAL: SERVING}
            assert client.generate_image("a red circle", "tf", ImageOptions(steps=2)).png
    finally:
        release.set()
        server.stop()


def test_serve_no_build_stops_at_once_naming_the_directory_and_the_command(tmp_path, pico_dir):
    config = tmp_path / "server.yaml"
    config.write_text(f"models:\n  - {{name: lm, path: {tmp_path / 'home' / 'lm'}, build: pico}}\n"
                      f"  - {{name: pruned, path: {tmp_path / 'pruned'}, build: tiny-lm-angular-25}}\n"
                      f"  - {{name: mine, path: {tmp_path / 'mine'}}}\n"
                      f"  - {{name: ready, path: {pico_dir}}}\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "prunefusion.cli", "serve", "--config", str(config), "--no-build",
                           "--port", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started < 60  # nothing was built or loaded
    err = done.stderr
    assert f"model lm: {tmp_path / 'home' / 'lm'} holds no model" in err
    assert f"prunefusion models build --recipe pico --out {tmp_path / 'home' / 'lm'} --no-pruned" in err
    assert "prunefusion compress run " in err and f"tiny-lm-angular-25.yaml --out {tmp_path / 'pruned'}" in err
    assert f"model mine: {tmp_path / 'mine'} holds no model" in err and "give the model a build:" in err
    assert "model ready" not in err
    assert not (tmp_path / "home").exists()


def test_the_build_command_it_names_builds_what_serve_would(tmp_path):
    """The command `--no-build` prints is a real one: run it, and the model is there for `serve --no-build`."""
    from prunefusion.models.builds import build_command

    out = tmp_path / "lm"
    command = build_command("pico", out).split()
    done = subprocess.run([sys.executable, "-m", "prunefusion.cli", *command[1:]], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "config.json").is_file()
