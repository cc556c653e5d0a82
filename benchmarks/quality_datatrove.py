"""prunefusion's rule filters against datatrove 0.10.1: the same keep/drop decisions, and how much faster.

Agreement: on `rule_corpus(--documents, --seed)` (every rule of every family fires; pick a fresh seed for a figure
nobody tuned to), the share of documents where our first reason (or keep) equals datatrove's, per family and for
the chain (one Document through GopherRepetition, GopherQuality, C4 and FineWeb, as a datatrove pipeline runs
them), for each of our rule profiles; the same on --files (one document per file: real text, e.g. the licences and
READMEs under /usr/share/doc). Every disagreement of the default profile is written out.

Throughput: documents/s on one core (this process), per family and for the chain, in --rounds interleaved rounds
(each round times every contender once, in turn, so the machine's drift hits all alike): datatrove with its
default English tokenizer (spaCy), datatrove with a regex word tokenizer, and our two profiles. Our spaCy chunk
cache and datatrove's word cache are cleared before every timed run, so no run reuses another's work. Ratios are
per round; the table gives their median and range.

    .venv/bin/python benchmarks/quality_datatrove.py [--documents 2000] [--seed N] [--rounds 5]
        [--timing-documents 600] [--files GLOB ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline import filters as datatrove_filters_module
from datatrove.utils.text import split_into_parts
from datatrove.utils.word_tokenizers import WordTokenizer

from prunefusion.quality import spacy_text
from prunefusion.quality.rule_corpus import rule_corpus
from prunefusion.quality.rule_profiles import FAMILIES, RULE_PROFILES, apply_rules, build_rules
from prunefusion.quality.rules_datatrove import RULE_FILTERS

DATATROVE = {family: getattr(datatrove_filters_module, cls.DATATROVE_FILTER) for family, cls in RULE_FILTERS.items()}
PREFIX = {family: cls.REASON_PREFIX for family, cls in RULE_FILTERS.items()}  # our code = prefix + theirs


class RegexWordTokenizer(WordTokenizer):
    """A common fast stand-in for spaCy in datatrove pipelines: words are \\w+ runs and runs of other symbols."""

    _words = re.compile(r"\w+|[^\w\s]+")
    _sentences = re.compile(r"[^.!?]+(?:[.!?]+|$)")

    def word_tokenize(self, text: str) -> list[str]:
        return self._words.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s.strip() for s in self._sentences.findall(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in self._sentences.finditer(text) if m.group().strip()]


def datatrove_filters(tokenizer=None) -> dict:
    return {f: cls(**({} if tokenizer is None else {"language": tokenizer})) for f, cls in DATATROVE.items()}


def datatrove_run(filters: dict, text: str) -> str | None:
    """One Document through the filters in order: our code for the dropping filter's reason, None when kept."""
    document = Document(text=text, id="0")
    for family, family_filter in filters.items():
        result = family_filter.filter(document)
        if result is not True:
            return PREFIX[family] + result[1]
    return None


def agreement(docs: list[str]) -> dict:
    filters = datatrove_filters()
    expected_family = {f: [datatrove_run({f: filters[f]}, t) for t in docs] for f in FAMILIES}
    expected_chain = [datatrove_run(filters, t) for t in docs]
    out = {}
    for profile in RULE_PROFILES:
        rules = dict(zip(FAMILIES, build_rules(profile, list(FAMILIES)), strict=True))
        row, disagreements = {}, []
        for family in FAMILIES:
            got = [(apply_rules(profile, [rules[family]], t)[0] or [None])[0] for t in docs]
            same = [g == e for g, e in zip(got, expected_family[family], strict=True)]
            keep_same = [(g is None) == (e is None) for g, e in zip(got, expected_family[family], strict=True)]
            row[family] = {"reason": sum(same) / len(docs), "keep_drop": sum(keep_same) / len(docs)}
            disagreements += [(i, family, e, g) for i, (g, e, s) in
                              enumerate(zip(got, expected_family[family], same, strict=True)) if not s]
        chain = [(apply_rules(profile, list(rules.values()), t)[0] or [None])[0] for t in docs]
        row["chain"] = {"reason": sum(g == e for g, e in zip(chain, expected_chain, strict=True)) / len(docs),
                        "keep_drop": sum((g is None) == (e is None) for g, e in
                                         zip(chain, expected_chain, strict=True)) / len(docs)}
        out[profile] = {"agreement": row, "disagreements": disagreements[:50], "n_disagreements": len(disagreements)}
    out["datatrove_kept_share"] = sum(e is None for e in expected_chain) / len(docs)
    return out


def contenders() -> dict:
    """name -> {family or "chain": callable(docs)}; each callable scores every document once."""
    def ours(profile: str) -> dict:
        rules = dict(zip(FAMILIES, build_rules(profile, list(FAMILIES)), strict=True))

        def run(chosen: list) -> Callable:
            def score(docs: list[str]) -> None:
                for t in docs:
                    apply_rules(profile, chosen, t)
            score.reset = spacy_text.clear_caches  # before the clock starts
            return score
        return {**{f: run([rules[f]]) for f in FAMILIES}, "chain": run(list(rules.values()))}

    def theirs(tokenizer) -> dict:
        filters = datatrove_filters(tokenizer)

        def run(chosen: dict) -> Callable:
            def score(docs: list[str]) -> None:
                for t in docs:
                    datatrove_run(chosen, t)
            score.reset = split_into_parts.cache_clear  # datatrove's word cache (5 texts) starts empty too
            return score
        return {**{f: run({f: filters[f]}) for f in FAMILIES}, "chain": run(filters)}

    return {"datatrove (spaCy)": theirs(None), "datatrove (regex words)": theirs(RegexWordTokenizer()),
            **{f"prunefusion {p}": ours(p) for p in RULE_PROFILES}}


def throughput(docs: list[str], rounds: int, targets: list[str] | None = None) -> dict:
    runs = contenders()
    targets = targets or [*FAMILIES, "chain"]
    for table in runs.values():  # warm-up: imports, spaCy pipelines, numpy
        table["chain"](docs[:20])
    rates: dict[str, dict[str, list[float]]] = {name: {k: [] for k in targets} for name, table in runs.items()}
    for _ in range(rounds):
        for target in targets:
            for name, table in runs.items():
                table[target].reset()
                started = time.perf_counter()
                table[target](docs)
                rates[name][target].append(len(docs) / (time.perf_counter() - started))
    return rates


def summary(rates: dict) -> list[str]:
    base = "datatrove (spaCy)"
    lines = ["| docs/s (median of rounds) | " + " | ".join([*FAMILIES, "chain"]) + " |",
             "|---|" + "---|" * (len(FAMILIES) + 1)]
    for name, table in rates.items():
        cells = []
        for target, values in table.items():
            ratios = [v / b for v, b in zip(values, rates[base][target], strict=True)]
            cell = f"{statistics.median(values):,.0f}"
            if name != base:
                cell += f" ({statistics.median(ratios):.1f}x, {min(ratios):.1f}-{max(ratios):.1f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=2000, help="agreement corpus size")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000, help="default: from the clock")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timing-documents", type=int, default=600,
                        help="the first N documents of at most --timing-max-chars are timed")
    parser.add_argument("--timing-max-chars", type=int, default=100_000,
                        help="longer documents (the corpus's rare 'huge' kind, ~1.4 MB, most of its characters) "
                             "are timed apart: up to 3 of them, the chain alone")
    parser.add_argument("--files", nargs="*", default=[], metavar="GLOB",
                        help="also measure agreement on these files, one document each (real text nobody tuned to, "
                             "e.g. '/usr/share/doc/*/copyright' '/usr/share/doc/*/README*')")
    parser.add_argument("--out", type=Path, default=None, help="write quality_datatrove.json and .md here")
    args = parser.parse_args()

    docs = [d.text for d in rule_corpus(args.documents, seed=args.seed)]
    paths = sorted({p for pattern in args.files for p in glob.glob(pattern) if Path(p).is_file()})
    files = [Path(p).read_text(errors="replace") for p in paths]
    print(f"rule corpus: {len(docs)} documents, seed {args.seed}, {sum(map(len, docs)) / 1e6:.1f} M characters; "
          f"{len(files)} files")
    corpora = {f"rule corpus, {len(docs)} documents, seed {args.seed}": docs}
    if files:
        corpora[f"{len(files)} files ({', '.join(args.files)})"] = files
    agree, lines = {}, []
    for name, texts in corpora.items():
        agree[name] = found = agreement(texts)
        lines += [f"## Agreement with datatrove 0.10.1: {name} (datatrove keeps {found['datatrove_kept_share']:.1%})",
                  "", "| profile | " + " | ".join([*FAMILIES, "chain"]) + " |",
                  "|---|" + "---|" * (len(FAMILIES) + 1)]
        for profile in RULE_PROFILES:
            row = found[profile]["agreement"]
            lines.append(f"| {profile}: same keep/drop | " + " | ".join(f"{row[k]['keep_drop']:.2%}" for k in row)
                         + " |")
            lines.append(f"| {profile}: same reason | " + " | ".join(f"{row[k]['reason']:.2%}" for k in row) + " |")
        lines.append("")
    timed = [t for t in docs if len(t) <= args.timing_max_chars][:args.timing_documents]
    huge = [t for t in docs if len(t) > args.timing_max_chars][:3]
    rates = throughput(timed, args.rounds)
    lines += [f"## Throughput, one core ({len(timed)} documents, {sum(map(len, timed)) / 1e6:.2f} M characters, "
              f"{args.rounds} interleaved rounds; in brackets: x datatrove (spaCy), median and range)", "",
              *summary(rates)]
    if huge:
        huge_rates = {name: table["chain"] for name, table in throughput(huge, args.rounds, ["chain"]).items()}
        base = huge_rates["datatrove (spaCy)"]
        lines += ["", f"Documents over {args.timing_max_chars:,} characters ({len(huge)}, "
                  f"{sum(map(len, huge)) / len(huge) / 1e6:.2f} M characters each), the chain: "
                  + "; ".join(f"{name} {1 / statistics.median(v):.2f} s/doc"
                              + ("" if name == "datatrove (spaCy)" else
                                 f" ({statistics.median([x / b for x, b in zip(v, base, strict=True)]):.1f}x)")
                              for name, v in huge_rates.items())]
    print("\n".join(lines))
    for name, found in agree.items():
        print(f"\n{name}: default profile disagreements: {found['datatrove']['n_disagreements']}",
              found["datatrove"]["disagreements"][:10])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {"seed": args.seed, "documents": len(docs), "timing_documents": len(timed), "rounds": args.rounds,
                  "agreement": agree, "docs_per_second": rates, "machine": platform.platform(),
                  "python": platform.python_version()}
        (args.out / "quality_datatrove.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "quality_datatrove.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
