"""Embeddings through the server (gRPC Embed, its own process): the ONNX Runtime engine vs the torch encoder engine
on all-MiniLM-L6-v2, and the pruned MiniLM (4 of 6 layers) vs the original, both on ONNX, in interleaved rounds.

Goals (issue 15): ONNX >= 1.3x torch sentences/s at batch 32 on CPU; pruned >= 1.35x the original's; cosine to
sentence-transformers >= 0.9999. Each request carries 32 held-out stdlib-corpus sentences (one forward pass of 32:
max_batch_size 32); a round sends `--requests` of them to each model in turn, the order rotating each round.

The pruned model's speed does not depend on its healing, so by default it is layers [3, 5) cut out and not healed
(the served variant, `build: onnx:minilm-2of6`, is healed by the compression job: pass its export with --pruned).

    .venv/bin/python benchmarks/embeddings_serving.py [--rounds 5 --requests 10 --threads 2] [--pruned DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from prunefusion.loadtest.server_process import ServerProcess
from prunefusion_client import Client
from prunefusion_client.client import vectors

BATCH = 32


def pruned_minilm(out: Path, start: int = 3, end: int = 5) -> Path:
    """MiniLM with layers [start, end) removed (unhealed), saved as a checkpoint with the original's tokenizer."""
    from prunefusion.compression.layers import prune_layers
    from prunefusion.model_kinds import ENCODER
    from prunefusion.quality.embeddings import TOKENIZER_FILES, minilm_dir

    model, _ = ENCODER.load(minilm_dir())
    pruned, _ = prune_layers(model, start, end)
    pruned.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy2(minilm_dir() / name, out / name)
    return out


def prepare(work: Path, pruned: Path | None) -> dict[str, Path]:
    from prunefusion.models.onnx_build import build_onnx
    from prunefusion.quality.embeddings import minilm_dir

    build_onnx("onnx:minilm", work / "minilm-onnx", False)
    if pruned is None:
        pruned = work / "pruned-onnx"
        build_onnx(f"onnx:{pruned_minilm(work / 'pruned')}", pruned, False)
    return {"onnx": work / "minilm-onnx", "torch": minilm_dir(), "pruned": pruned}


def write_config(work: Path, dirs: dict[str, Path], threads: int) -> Path:
    engines = {"onnx": "onnx", "torch": "torch-encoder", "pruned": "onnx"}
    lines = ["server: {host: 127.0.0.1, log_level: WARNING, metrics_port: null, http_port: null}",
             "cache: {enabled: false}", "quality: {enabled: false}", "models:"]
    for name, path in dirs.items():
        extra = f", threads: {threads}" if engines[name] == "onnx" else ""
        lines.append(f"  - {{name: {name}, engine: {engines[name]}, path: '{path}', max_batch_size: {BATCH}{extra}, "
                     f"embeddings: {{max_tokens: 256}}}}")
    config = work / "embeddings.yaml"
    config.write_text("\n".join(lines) + "\n")
    return config


def sentences_per_second(client: Client, model: str, batches: list[list[str]]) -> float:
    started = time.perf_counter()
    for texts in batches:
        client.embed(texts, model)
    return sum(len(b) for b in batches) / (time.perf_counter() - started)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x (min {min(values):.2f}, max {max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=10, help="requests of 32 sentences per model per round")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (torch: its default)")
    parser.add_argument("--pruned", type=Path, help="an ONNX export of the pruned MiniLM (default: made here)")
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from prunefusion.models.corpus import sentence_splits
    from prunefusion.quality.embeddings import minilm_dir

    held_out = sentence_splits()[1]
    texts = [held_out[i % len(held_out)] for i in range(BATCH * args.requests)]
    batches = [texts[i:i + BATCH] for i in range(0, len(texts), BATCH)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dirs = prepare(work, args.pruned)
        server = ServerProcess(write_config(work, dirs, args.threads), startup_timeout_s=300, log=work / "server.log")
        try:
            with Client(server.target, timeout=120, max_attempts=1) as client:
                reference = SentenceTransformer(str(minilm_dir()), device="cpu").encode(batches[0])
                cosines = {m: float((np.array(vectors(client.embed(batches[0], m))) * reference).sum(1).min())
                           for m in dirs}
                models = list(dirs)
                for m in models:  # warm-up
                    sentences_per_second(client, m, batches[:2])
                rates: dict[str, list[float]] = {m: [] for m in models}
                for r in range(args.rounds):
                    for m in models[r % len(models):] + models[:r % len(models)]:
                        rates[m].append(sentences_per_second(client, m, batches))
        finally:
            server.stop()
    ratio = {"onnx / torch": [o / t for o, t in zip(rates["onnx"], rates["torch"], strict=True)],
             "pruned / original (onnx)": [p / o for p, o in zip(rates["pruned"], rates["onnx"], strict=True)]}
    print(f"all-MiniLM-L6-v2, {BATCH} sentences a request, {args.rounds} rounds x {args.requests} requests, "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, onnxruntime threads {args.threads}")
    for m in models:
        print(f"  {m:<8} {statistics.median(rates[m]):7.1f} sentences/s (min {min(rates[m]):.1f}, "
              f"max {max(rates[m]):.1f}); min cosine to sentence-transformers {cosines[m]:.6f}")
    for name, values in ratio.items():
        print(f"  {name:<26} {spread(values)}")


if __name__ == "__main__":
    main()
