"""Every command of both console scripts answers --help (exit 0, a usage line), built by one argparse style."""

from __future__ import annotations

import pytest

from prunefusion.cli import build_parser, main, subcommands
from prunefusion_client.cli import build_parser as client_parser
from prunefusion_client.cli import main as client_main


def command_paths(parser, prefix=()) -> list[tuple[str, ...]]:
    """Every command path below `parser`: (), ("serve",), ("compress",), ("compress", "prune"), ..."""
    paths = [prefix]
    for name, sub in subcommands(parser).items():
        paths += command_paths(sub, (*prefix, name))
    return paths


PATHS = command_paths(build_parser())
CLIENT_PATHS = command_paths(client_parser())


def test_the_walk_finds_the_nested_commands():
    assert {("score", "files"), ("score", "calibrate"), ("compress", "prune"), ("models", "build"), ("serve",),
            ("loadtest",), ("transfusion", "sample")} <= set(PATHS)
    assert {("generate",), ("models",), ("image",), ("caption",)} <= set(CLIENT_PATHS)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "prunefusion")
def test_help(path, capsys):
    with pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: prunefusion {' '.join(path)}".rstrip())


@pytest.mark.parametrize("path", CLIENT_PATHS, ids=lambda p: " ".join(p) or "prunefusion-client")
def test_client_help(path, capsys):
    with pytest.raises(SystemExit) as done:
        client_main([*path, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage: prunefusion-client")


def test_score_files_is_the_default_subcommand(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The river floods every spring, and the town has learned to live with it for many years.")
    outputs = []
    for command in (["score"], ["score", "files"]):
        out, rejected = tmp_path / f"kept-{len(command)}.jsonl", tmp_path / f"rejected-{len(command)}.jsonl"
        assert main([*command, str(doc), "--out", str(out), "--rejected", str(rejected), "--workers", "0"]) == 0
        outputs.append(out.read_text() + rejected.read_text())
    assert outputs[0] == outputs[1] and '"quality"' in outputs[0]
    capsys.readouterr()
    assert main(["score", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.txt" in err and err.count("\n") == 1
