"""Does Sharma-score pruning work? Train the default LM for the same number of steps on (A) the top 60% of a mixed
corpus by Sharma score, (B) a seeded random 60%, and (C) all of it, and compare held-out loss on clean prose.

Training data: `mixed_corpus(n_documents, junk_fraction=0.4, seed)`: clean prose paragraphs made of the stdlib
corpus' TRAIN-split prose sentences, plus junk (boilerplate, repeated lines, code dumps, lists, lorem ipsum). Each
document is scored with the Sharma score and the shipped weights (quality/default_weights.json).

Evaluation text: clean prose only, disjoint from training: the stdlib corpus' held-out prose sentences
(`sentence_splits()`, which already drops any held-out sentence also found in a training document), minus any whose
whitespace-normalised text occurs anywhere in the training documents (the code-dump junk is stdlib source and can
quote docstrings), grouped like the clean documents (paragraphs of 3-6 sentences, 2-4 paragraphs), each sentence once.

`build_model` trains each run's BPE tokenizer on that run's training documents, so per-token losses are not
comparable between runs. The headline metric is tokenizer-independent: nats per CHARACTER = total NLL of the
evaluation text (every token after BOS, EOS excluded; windows of the recipe's seq_len, stride seq_len/2, each token
scored once with up to seq_len/2 tokens of context) / number of characters; bits per UTF-8 byte is the same quantity
in other units.

    .venv/bin/python benchmarks/quality_pruning_experiment.py [--documents 3000] [--keep 0.6] [--steps 400]
        [--recipe default] [--seeds 0] [--selections A B C] [--threads N] [--device cpu] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from prunefusion.models.build import build_model
from prunefusion.models.corpus import Corpus, sentence_splits
from prunefusion.models.recipes import RECIPES
from prunefusion.quality.mixed_corpus import Document, mixed_corpus
from prunefusion.quality.sharma import DEFAULT_WEIGHTS, Weights, document_score

SELECTIONS = {"A": "top by Sharma score", "B": "random", "C": "all documents"}


def normalise(text: str) -> str:
    return " ".join(text.split())


def evaluation_documents(train_docs: list[Document], seed: int) -> tuple[list[str], dict]:
    """Clean prose documents from held-out sentences that occur nowhere in the training documents."""
    _, held = sentence_splits()
    training_text = "\n".join(normalise(d.text) for d in train_docs)
    fresh = [s for s in held if normalise(s) not in training_text]
    rng = random.Random(seed)
    rng.shuffle(fresh)
    docs, i = [], 0
    while i < len(fresh):
        paragraphs = []
        for _ in range(rng.randint(2, 4)):
            n = rng.randint(3, 6)
            if i < len(fresh):
                paragraphs.append(" ".join(fresh[i:i + n]))
            i += n
        docs.append("\n\n".join(paragraphs))
    info = {"held_out_sentences": len(held), "dropped_found_in_training": len(held) - len(fresh),
            "sentences_used": len(fresh), "documents": len(docs), "characters": sum(map(len, docs))}
    return docs, info


@torch.no_grad()
def text_nll(model_dir: Path, docs: list[str], window: int, device: str = "cpu") -> dict:
    """Total NLL (nats) of the documents' tokens after BOS, EOS excluded, in windows of `window` tokens with stride
    `window // 2` (each token scored once, with up to window/2 tokens of context)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    stride = window // 2
    total, tokens = 0.0, 0
    for enc in backend.encode_batch(docs, add_special_tokens=True):
        ids = torch.tensor(enc.ids, dtype=torch.long)
        if ids[0].item() != tokenizer.bos_token_id:
            raise RuntimeError("the tokenizer does not prepend BOS")
        n, scored_to = ids.numel(), 1  # targets [scored_to, end) are new in each window
        for begin in range(0, n - 1, stride):
            end = min(begin + window, n)
            logits = model(input_ids=ids[begin:end][None].to(device)).logits[0].float().cpu()
            logp = torch.log_softmax(logits[scored_to - begin - 1:end - begin - 1], dim=-1)
            targets = ids[scored_to:end]
            total -= float(logp.gather(1, targets[:, None]).sum())
            tokens += targets.numel()
            scored_to = end
            if end == n:
                break
    chars = sum(map(len, docs))
    utf8 = sum(len(d.encode()) for d in docs)
    return {"nll_nats": total, "tokens": tokens, "characters": chars, "utf8_bytes": utf8,
            "nats_per_char": total / chars, "bits_per_byte": total / math.log(2) / utf8,
            "nats_per_token": total / tokens, "tokens_per_char": tokens / chars}


@dataclass
class Run:
    selection: str
    seed: int
    documents: int
    junk_documents: int
    junk_chars_share: float
    junk_kinds: dict[str, int]
    manifest: dict
    eval: dict
    seconds: float


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=3000)
    parser.add_argument("--junk-fraction", type=float, default=0.4)
    parser.add_argument("--corpus-seed", type=int, default=0)
    parser.add_argument("--keep", type=float, default=0.6, help="fraction of documents selected for A and B")
    parser.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (one run each per selection)")
    parser.add_argument("--selections", nargs="+", default=list(SELECTIONS), choices=list(SELECTIONS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="train and evaluate here, e.g. cuda")
    parser.add_argument("--out", type=Path, default=None, help="write quality_pruning_experiment.{json,md} here")
    args = parser.parse_args()
    started = time.time()
    recipe = RECIPES[args.recipe]

    corpus = mixed_corpus(n_documents=args.documents, junk_fraction=args.junk_fraction, seed=args.corpus_seed)
    n_junk_total = sum(d.kind != "clean" for d in corpus)
    eval_docs, eval_info = evaluation_documents(corpus, args.corpus_seed + 1)

    weights = Weights.load(DEFAULT_WEIGHTS)
    scores = [document_score(d.text, weights).score for d in corpus]
    k = round(args.keep * len(corpus))
    order = sorted(range(len(corpus)), key=lambda i: (-scores[i], i))
    chosen = {"A": sorted(order[:k]), "B": sorted(random.Random(args.corpus_seed).sample(range(len(corpus)), k)),
              "C": list(range(len(corpus)))}
    clean_scores = [s for s, d in zip(scores, corpus, strict=True) if d.kind == "clean"]
    junk_scores = [s for s, d in zip(scores, corpus, strict=True) if d.kind != "clean"]
    print(f"corpus: mixed_corpus(n_documents={args.documents}, junk_fraction={args.junk_fraction}, "
          f"seed={args.corpus_seed}): {len(corpus)} documents, {n_junk_total} junk, "
          f"{sum(len(d.text) for d in corpus):,} characters")
    print(f"Sharma score (weights {DEFAULT_WEIGHTS.name}): clean mean {statistics.mean(clean_scores):.3f}, junk mean "
          f"{statistics.mean(junk_scores):.3f}; top-{args.keep:.0%} cut-off {scores[order[k - 1]]:.3f}")
    print(f"evaluation: {eval_info['documents']} clean documents, {eval_info['sentences_used']} held-out sentences "
          f"({eval_info['dropped_found_in_training']} dropped: found in training), {eval_info['characters']:,} chars")
    print(f"training: recipe {args.recipe!r}, {args.steps} steps x {recipe.batch_size} x {recipe.seq_len} tokens, "
          f"seeds {args.seeds}, selections {args.selections}\n", flush=True)

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="quality-pruning-") as tmp:
        for seed in args.seeds:
            for name in args.selections:
                docs = [corpus[i] for i in chosen[name]]
                train = [d.text for d in docs]
                junk = [d for d in docs if d.kind != "clean"]
                t0 = time.time()
                result = build_model(args.recipe, Path(tmp) / f"{name}-{seed}", steps=args.steps, seed=seed,
                                     threads=args.threads, device=args.device,
                                     corpus=Corpus(train=train, held_out=eval_docs,
                                                   description=f"selection {name} ({SELECTIONS[name]}) of "
                                                               f"mixed_corpus({args.documents}, seed="
                                                               f"{args.corpus_seed}); held-out: clean prose"))
                ev = text_nll(result.path, eval_docs, recipe.seq_len, args.device)
                runs.append(Run(name, seed, len(docs), len(junk), sum(len(d.text) for d in junk) / sum(map(len, train)),
                                dict(Counter(d.kind for d in junk)), result.manifest, ev, time.time() - t0))
                print(f"[{name} seed {seed}] {ev['nats_per_char']:.4f} nats/char, {ev['bits_per_byte']:.4f} bits/byte, "
                      f"{ev['nats_per_token']:.3f} nats/token, {time.time() - t0:.0f} s", flush=True)

    lines = [f"Held-out CLEAN prose ({eval_info['characters']:,} chars, {eval_info['documents']} docs); recipe "
             f"{args.recipe!r}, {args.steps} steps, same seed per row group; headline = nats/char (tokenizer-"
             "independent). nats/token uses each run's own tokenizer: not comparable between rows.", "",
             "| selection | seed | docs | junk docs (share of selection) | junk docs kept / all junk | junk chars "
             "share | nats/char | bits/byte | nats/token (own tok.) | tokens/char | final train loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r.selection}: {SELECTIONS[r.selection]} | {r.seed} | {r.documents} | {r.junk_documents} "
                     f"({r.junk_documents / r.documents:.1%}) | {r.junk_documents / n_junk_total:.1%} | "
                     f"{r.junk_chars_share:.1%} | {r.eval['nats_per_char']:.4f} | {r.eval['bits_per_byte']:.4f} | "
                     f"{r.eval['nats_per_token']:.3f} | {r.eval['tokens_per_char']:.3f} | "
                     f"{r.manifest['training']['final_train_loss']:.3f} |")
    ratios = {}
    for seed in args.seeds:
        by = {r.selection: r.eval["nats_per_char"] for r in runs if r.seed == seed}
        for a, b in (("A", "B"), ("A", "C"), ("B", "C")):
            if a in by and b in by:
                ratios[f"{a}/{b} seed {seed}"] = by[a] / by[b]
    lines.append("")
    for label, ratio in ratios.items():
        lines.append(f"- nats/char ratio {label}: {ratio:.4f} ({ratio - 1:+.2%})")
    table = "\n".join(lines)
    print("\n" + table)
    print(f"\ntotal {time.time() - started:.0f} s")

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        doc = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "weights": str(DEFAULT_WEIGHTS), "evaluation": eval_info, "junk_documents_total": n_junk_total,
               "score_means": {"clean": statistics.mean(clean_scores), "junk": statistics.mean(junk_scores)},
               "ratios_nats_per_char": ratios,
               "runs": [{"selection": r.selection, "description": SELECTIONS[r.selection], "seed": r.seed,
                         "documents": r.documents, "junk_documents": r.junk_documents,
                         "junk_chars_share": r.junk_chars_share, "junk_kinds": r.junk_kinds, "eval": r.eval,
                         "build_held_out_perplexity_own_tokenizer": r.manifest["metrics"]["held_out_perplexity"],
                         "corpus": r.manifest["corpus"], "training": r.manifest["training"], "seconds": r.seconds}
                        for r in runs]}
        (args.out / "quality_pruning_experiment.json").write_text(json.dumps(doc, indent=2) + "\n")
        (args.out / "quality_pruning_experiment.md").write_text(table + "\n")
        print(f"wrote {args.out}/quality_pruning_experiment.{{json,md}}")


if __name__ == "__main__":
    main()
