"""`prunefusion compress evaluate`: original vs pruned vs healed in one table.

Causal LMs: held-out perplexity; multiple-choice accuracy by log-likelihood over a local JSONL task ({"context",
"choices", "answer"}: the choice with the highest summed log-probability given the context wins); greedy decode
tokens/s; parameter count and weight memory. Encoders (evaluate_encoders): mean cosine of sentence embeddings to the
original's, sentences embedded per second, size.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class Evaluation:
    model: str
    num_layers: int
    parameters: int
    weight_mib: float
    held_out_perplexity: float
    decode_tokens_per_s: float
    mc_accuracy: float | None = None


@torch.no_grad()
def choice_logprob(model, tokenizer, context: str, choice: str) -> float:
    """sum_t log p(choice_t | context, choice_<t). The choice's tokens are those the joint text adds."""
    context_ids = tokenizer(context)["input_ids"]
    full_ids = tokenizer(context + choice)["input_ids"]
    if full_ids[: len(context_ids)] != context_ids or len(full_ids) == len(context_ids):
        raise ValueError(f"choice {choice!r} does not extend the context's tokens; start it with a space")
    logits = model(input_ids=torch.tensor([full_ids])).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(full_ids[1:])
    picked = logprobs[torch.arange(len(targets)), targets]
    return float(picked[len(context_ids) - 1:].sum())


def mc_accuracy(model, tokenizer, task: list[dict]) -> float:
    correct = 0
    for item in task:
        scores = [choice_logprob(model, tokenizer, item["context"], c) for c in item["choices"]]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == int(item["answer"]))
    return correct / len(task)


@torch.no_grad()
def decode_speed(model, tokenizer, prompts: list[str], new_tokens: int = 64) -> float:
    ids = [tokenizer(p, return_tensors="pt")["input_ids"] for p in prompts]
    model.generate(ids[0], max_new_tokens=4, do_sample=False)  # warm-up
    produced, start = 0, time.perf_counter()
    for x in ids:
        out = model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        produced += out.shape[1] - x.shape[1]
    return produced / (time.perf_counter() - start)


def evaluate(model_dir: Path, held_out: list[str], task: list[dict] | None = None) -> Evaluation:
    from prunefusion.compression.layers import find_layers
    from prunefusion.model_kinds import CAUSAL_LM
    from prunefusion.models.build import pack_documents, perplexity, windows

    model, tokenizer = CAUSAL_LM.load(Path(model_dir))
    rows = windows(pack_documents(tokenizer, held_out), 256)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return Evaluation(
        model=str(model_dir), num_layers=len(find_layers(model)[1]), parameters=params,
        weight_mib=weight_bytes / 2**20, held_out_perplexity=perplexity(model, rows),
        decode_tokens_per_s=decode_speed(model, tokenizer, ["The os module", "Lists are", "Raised when"]),
        mc_accuracy=mc_accuracy(model, tokenizer, task) if task else None)


def evaluate_causal_lms(model_dirs: list[Path], held_out: list[str], task: list[dict] | None = None) -> list[dict]:
    """The causal-LM row of the model-kind table: one evaluation row per model."""
    return to_json([evaluate(Path(m), held_out, task) for m in model_dirs])


def evaluate_encoders(model_dirs: list[Path], held_out: list[str], task: list[dict] | None = None) -> list[dict]:
    """Encoders (sentence embeddings by mean pooling): mean cosine of each model's embeddings of the held-out
    sentences to the first model's (the original), sentences embedded per second, size."""
    from prunefusion.compression.distill import mean_cosine, mean_pooled_embeddings
    from prunefusion.compression.layers import find_layers
    from prunefusion.model_kinds import ENCODER

    if task is not None:
        raise ValueError("a multiple-choice task is for causal LMs; encoders are evaluated on held-out sentences")
    rows, reference = [], None
    for model_dir in model_dirs:
        model, tokenizer = ENCODER.load(Path(model_dir))
        mean_pooled_embeddings(model, tokenizer, held_out[:32])  # warm-up
        start = time.perf_counter()
        embeddings = mean_pooled_embeddings(model, tokenizer, held_out)
        seconds = time.perf_counter() - start
        reference = embeddings if reference is None else reference
        cosines = torch.nn.functional.cosine_similarity(embeddings.double(), reference.double(), dim=-1)
        rows.append({"model": str(model_dir), "num_layers": len(find_layers(model)[1]),
                     "parameters": sum(p.numel() for p in model.parameters()),
                     "weight_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
                     "mean_cosine": mean_cosine(embeddings, reference),
                     "cosine_p5": float(torch.quantile(cosines, 0.05)), "cosine_min": float(cosines.min()),
                     "sentences_per_s": len(held_out) / seconds})
    return rows


def load_task(path: Path) -> list[dict]:
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for number, item in enumerate(items, 1):
        if not {"context", "choices", "answer"} <= item.keys():
            raise ValueError(f"{path}:{number}: needs context, choices and answer")
    return items


SPEEDS = ("decode_tokens_per_s", "sentences_per_s")  # shown with their ratio to the first row


def rows_table(rows: list[dict]) -> str:
    """Evaluation rows (dicts with a "label") -> a markdown table of the columns any row has."""
    columns = ("num_layers", "parameters", "weight_mib", "held_out_perplexity", "mean_cosine", "cosine_p5",
               "cosine_min", "decode_tokens_per_s", "sentences_per_s", "mc_accuracy")
    keys = [k for k in columns if any(r.get(k) is not None for r in rows)]
    lines = ["| model | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for row in rows:
        cells = []
        for key in keys:
            value = row.get(key)
            cells.append("" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:.4g}")
            if key in SPEEDS and value is not None and rows[0].get(key):
                cells[-1] += f" ({value / rows[0][key]:.2f}x)"
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_json(results: list[Evaluation]) -> list[dict]:
    return [asdict(r) for r in results]
