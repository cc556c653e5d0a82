"""Throughput of prunefusion.quality on CPU: documents/s for the Sharma score, each rule filter family and the whole
default pipeline on one core; the pipeline on 2 worker processes against 1; sentence embeddings/s on 2 threads for
ONNX fp32, ONNX int8 and sentence-transformers on torch.

The corpus is fixed and seeded: the texts of `mixed_corpus(...)` (clean stdlib prose and junk) concatenated in order
until each document holds ~3.5 KB, cut at the line break nearest 3.5 KB. Every number is one warm-up call, then the
median of `--repeats` timed runs; ratios are measured side by side in this one run. Goal: >= 1,000 docs/s per core
for the Sharma score and for the rule filters.

    .venv/bin/python benchmarks/quality_throughput.py [--documents 2000] [--doc-chars 3500] [--repeats 3]
        [--sentences 500] [--threads 2] [--cache-dir DIR] [--skip-embeddings] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

from _server import median_seconds

from prunefusion.quality import spacy_text
from prunefusion.quality.pipeline import ScoreOptions, score_batch
from prunefusion.quality.rule_profiles import DEFAULT_RULE_PROFILE, FAMILIES, apply_rules, build_rules
from prunefusion.quality.sharma import DEFAULT_WEIGHTS, Weights, document_score

GOAL_DOCS_PER_S = 1000.0
CHUNK = 64


def fixed_documents(n: int, doc_chars: int, seed: int = 0) -> list[str]:
    """`n` documents of ~`doc_chars` characters: mixed_corpus texts concatenated in order, cut at the nearest line
    break (within 20%; else at `doc_chars` exactly)."""
    from prunefusion.quality.mixed_corpus import mixed_corpus

    raw = [d.text for d in mixed_corpus(n_documents=max(64, int(n * doc_chars / 700)), seed=seed)]
    rng = random.Random(seed)
    docs: list[str] = []
    i = 0
    while len(docs) < n:
        parts: list[str] = []
        size = 0
        while size < doc_chars:
            if i == len(raw):  # ran out: go round again in another order
                rng.shuffle(raw)
                i = 0
            parts.append(raw[i])
            size += len(raw[i]) + 2
            i += 1
        text = "\n\n".join(parts)
        before, after = text.rfind("\n", 0, doc_chars + 1), text.find("\n", doc_chars)
        cuts = [c for c in (before, after) if doc_chars * 0.8 <= c <= doc_chars * 1.2]
        docs.append(text[:min(cuts, key=lambda c: abs(c - doc_chars))] if cuts else text[:doc_chars])
    return docs


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def bench_documents(docs: list[str], weights: Weights, repeats: int) -> dict[str, float]:
    """docs/s on one core (this process) for the Sharma score, each rule family and the whole pipeline."""
    n = len(docs)
    head = docs[:CHUNK]
    rates: dict[str, float] = {}
    rates["sharma"] = n / median_seconds(lambda: [document_score(t, weights) for t in docs], repeats,
                                         lambda: [document_score(t, weights) for t in head])
    for name in FAMILIES:  # the default rule profile's; its spaCy chunk cache starts empty in every timed run
        rule = build_rules(DEFAULT_RULE_PROFILE, [name])

        def run(rule=rule, texts=docs) -> None:
            spacy_text.clear_caches()
            for t in texts:
                apply_rules(DEFAULT_RULE_PROFILE, rule, t)

        rates[name] = n / median_seconds(run, repeats, lambda run=run: run(texts=head))
    options = ScoreOptions()
    pairs = [(f"doc-{i}", t) for i, t in enumerate(docs)]
    batches = chunks(pairs, CHUNK)
    rates["pipeline"] = n / median_seconds(lambda: [spacy_text.clear_caches(),
                                                    *(score_batch(b, options, weights) for b in batches)], repeats,
                                           lambda: score_batch(batches[0], options, weights))
    return rates


def _warm_worker(seconds: float) -> int:
    time.sleep(seconds)  # long enough that each warm-up task lands on its own worker
    return os.getpid()


def bench_pool(docs: list[str], weights: Weights, workers: int, repeats: int) -> float:
    """docs/s for the whole pipeline on `workers` spawned processes, chunks of CHUNK documents (as the server)."""
    options = ScoreOptions()
    batches = chunks([(f"doc-{i}", t) for i, t in enumerate(docs)], CHUNK)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pids = set(pool.map(_warm_worker, [0.5] * workers))
        if len(pids) != workers:
            raise RuntimeError(f"expected {workers} started workers, got {len(pids)}")

        def run() -> None:
            results = list(pool.map(score_batch, batches, repeat(options), repeat(weights)))
            assert sum(r.documents for r in results) == len(docs)

        def warmup() -> None:
            list(pool.map(score_batch, batches[:workers * 2], repeat(options), repeat(weights)))

        return len(docs) / median_seconds(run, repeats, warmup)


def bench_embeddings(sentences: list[str], threads: int, repeats: int, cache_dir: Path) -> dict[str, float]:
    """sentences/s on `threads` threads: ONNX fp32, ONNX int8, sentence-transformers (torch)."""
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from prunefusion.quality.embeddings import default_embedder, minilm_dir

    n = len(sentences)
    rates: dict[str, float] = {}
    start = time.perf_counter()
    fp32 = default_embedder(cache_dir=cache_dir, int8=False, threads=threads)
    int8 = default_embedder(cache_dir=cache_dir, int8=True, threads=threads)
    rates["export_and_load_seconds"] = time.perf_counter() - start
    rates["onnx_fp32"] = n / median_seconds(lambda: fp32.embed(sentences, batch_size=CHUNK), repeats)
    rates["onnx_int8"] = n / median_seconds(lambda: int8.embed(sentences, batch_size=CHUNK), repeats)

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(minilm_dir()), device="cpu")

    def st() -> np.ndarray:
        with torch.inference_mode():
            return model.encode(sentences, batch_size=CHUNK, normalize_embeddings=True, convert_to_numpy=True)

    rates["sentence_transformers"] = n / median_seconds(st, repeats)
    reference = st()
    rates["min_cosine_fp32_vs_st"] = float(np.min(np.sum(fp32.embed(sentences) * reference, axis=1)))
    rates["min_cosine_int8_vs_st"] = float(np.min(np.sum(int8.embed(sentences) * reference, axis=1)))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--doc-chars", type=int, default=3500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2, help="threads for the embedding runs")
    parser.add_argument("--workers", type=int, default=2, help="processes for the parallel pipeline run")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="MiniLM ONNX export folder (default: a temporary folder, exported afresh)")
    parser.add_argument("--skip-embeddings", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write quality_throughput.json here")
    args = parser.parse_args()

    weights = Weights.load(DEFAULT_WEIGHTS)
    docs = fixed_documents(args.documents, args.doc_chars)
    mean_chars = sum(map(len, docs)) / len(docs)
    print(f"{len(docs)} documents, mean {mean_chars:.0f} characters ({sum(map(len, docs)) / 1e6:.2f} MB); "
          f"weights {DEFAULT_WEIGHTS.name}; {os.cpu_count()} CPUs, Python {platform.python_version()}")

    rates = bench_documents(docs, weights, args.repeats)
    pool_1 = bench_pool(docs, weights, 1, args.repeats)
    pool_n = bench_pool(docs, weights, args.workers, args.repeats)

    rows = [("Sharma score (document_score)", rates["sharma"], True)]
    rows += [(f"rules ({DEFAULT_RULE_PROFILE}): {name}", rates[name], True) for name in FAMILIES]
    rows += [("whole pipeline (score_batch, default options)", rates["pipeline"], False)]
    print(f"\nOne core (single process), docs of ~{mean_chars / 1000:.1f} KB; goal >= {GOAL_DOCS_PER_S:,.0f} docs/s "
          "per core for the Sharma score and the rule filters\n")
    print(f"| {'method':46} | {'docs/s':>8} | {'MB/s':>6} | goal |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 8}|------|")
    for label, rate, goal in rows:
        verdict = ("met" if rate >= GOAL_DOCS_PER_S else "MISS") if goal else "-"
        print(f"| {label:46} | {rate:8.0f} | {rate * mean_chars / 1e6:6.2f} | {verdict:4} |")
    print(f"\nWhole pipeline on a process pool (spawn, chunks of {CHUNK} docs)\n")
    print(f"| {'processes':46} | {'docs/s':>8} | {'ratio':>6} |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 8}|")
    print(f"| {'in-process (no pool)':46} | {rates['pipeline']:8.0f} | {rates['pipeline'] / pool_1:5.2f}x |")
    print(f"| {'1 worker':46} | {pool_1:8.0f} | {1.0:5.2f}x |")
    print(f"| {f'{args.workers} workers':46} | {pool_n:8.0f} | {pool_n / pool_1:5.2f}x |")

    result: dict = {"documents": len(docs), "mean_chars": mean_chars, "repeats": args.repeats,
                    "cpus": os.cpu_count(), "python": platform.python_version(), "docs_per_s_one_core": rates,
                    "pipeline_pool": {"workers": args.workers, "chunk": CHUNK, "one_worker_docs_per_s": pool_1,
                                      "workers_docs_per_s": pool_n, "ratio": pool_n / pool_1},
                    "goal_docs_per_s": GOAL_DOCS_PER_S}

    if not args.skip_embeddings:
        from prunefusion.models.corpus import prose_sentences, stdlib_corpus

        pool = prose_sentences(stdlib_corpus().train)
        sentences = random.Random(0).sample(pool, min(args.sentences, len(pool)))
        with tempfile.TemporaryDirectory(prefix="minilm-onnx-") as tmp:
            emb = bench_embeddings(sentences, args.threads, args.repeats, args.cache_dir or Path(tmp) / "export")
        st = emb["sentence_transformers"]
        print(f"\nSentence embeddings, all-MiniLM-L6-v2, {len(sentences)} sentences (mean "
              f"{sum(map(len, sentences)) / len(sentences):.0f} chars), {args.threads} threads, batches of {CHUNK}\n")
        print(f"| {'engine':46} | {'sent/s':>8} | {'vs ST':>6} |")
        print(f"|{'-' * 48}|{'-' * 10}|{'-' * 8}|")
        for label, key in (("sentence-transformers (torch)", "sentence_transformers"),
                           ("ONNX fp32 (onnxruntime)", "onnx_fp32"), ("ONNX int8 (onnxruntime)", "onnx_int8")):
            print(f"| {label:46} | {emb[key]:8.0f} | {emb[key] / st:5.2f}x |")
        print(f"\nmin cosine to sentence-transformers: fp32 {emb['min_cosine_fp32_vs_st']:.6f}, "
              f"int8 {emb['min_cosine_int8_vs_st']:.4f}; export + load {emb['export_and_load_seconds']:.1f} s")
        result["embeddings"] = {"sentences": len(sentences), "threads": args.threads, "batch_size": CHUNK,
                                "sentences_per_s": emb,
                                "ratio_vs_sentence_transformers": {k: emb[k] / st for k in ("onnx_fp32", "onnx_int8")}}

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "quality_throughput.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
