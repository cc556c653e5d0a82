"""Calibrate the Sharma filter weights with a reference LM: w_i = max(0, (PPL_all - PPL_i) / PPL_all).

PPL_all is the reference LM's perplexity over every line of the calibration text; PPL_i over the lines that pass
filter i (token-weighted: exp(sum of token NLLs / number of tokens)). Each line's NLL is computed once, so the
fourteen (here ten) perplexities are masked sums over one pass of the LM. Lines are scored as they are scored at
filtering time: one line, alone, after the tokenizer's BOS token.

    prunefusion score calibrate --reference-model ~/.cache/prunefusion/models/tiny-lm --data corpus.jsonl --out w.json
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prunefusion.quality.sharma import FILTER_NAMES, Weights, line_signals, split_lines, weight_from_perplexity


@dataclass(frozen=True)
class LineNLL:
    nll: np.ndarray  # [N] summed next-token NLL of each line (nats)
    tokens: np.ndarray  # [N] predicted tokens of each line


def line_nll(model, tokenizer, lines: list[str], *, batch_size: int = 32, max_tokens: int = 128,
             progress: bool = True) -> LineNLL:
    """Summed NLL and token count per line (BOS + line, truncated to max_tokens), batched with right padding."""
    import torch
    from tqdm.auto import tqdm

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [bos + tokenizer(line, add_special_tokens=False)["input_ids"][: max_tokens - len(bos)] for line in lines]
    order = np.argsort([len(e) for e in encoded])  # similar lengths together: less padding
    nll, tokens = np.zeros(len(lines)), np.zeros(len(lines), dtype=np.int64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(lines), batch_size), desc="reference LM", unit="batch", disable=not progress):
        rows = [encoded[i] for i in order[start:start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        token_nll = (token_nll * mask[:, 1:]).sum(1).cpu().numpy()
        for k, i in enumerate(order[start:start + batch_size]):
            nll[i], tokens[i] = token_nll[k], len(rows[k]) - 1
    return LineNLL(nll, tokens)


def perplexity(nll: np.ndarray, tokens: np.ndarray) -> float:
    return math.exp(nll.sum() / max(int(tokens.sum()), 1))


def weights_from_nll(lines: list[str], scores: LineNLL) -> tuple[dict[str, float], dict]:
    """(weights by filter, details: PPL_all, PPL_i and line counts) from per-line NLLs."""
    passes = np.array([[line_signals(line)[name] for name in FILTER_NAMES] for line in lines], dtype=bool)
    usable = scores.tokens > 0
    ppl_all = perplexity(scores.nll[usable], scores.tokens[usable])
    weights, details = {}, {"ppl_all": ppl_all, "lines": int(usable.sum()), "filters": {}}
    for j, name in enumerate(FILTER_NAMES):
        keep = passes[:, j] & usable
        ppl_i = perplexity(scores.nll[keep], scores.tokens[keep]) if keep.any() else float("inf")
        weights[name] = weight_from_perplexity(ppl_all, ppl_i) if math.isfinite(ppl_i) else 0.0
        details["filters"][name] = {"ppl": ppl_i, "lines_passing": int(keep.sum()), "weight": weights[name]}
    return weights, details


def calibrate(reference_model: Path, texts: list[str], *, max_lines: int | None = 20000, seed: int = 0,
              data_description: str = "", batch_size: int = 32, device: str = "cpu") -> Weights:
    """Weights for the Sharma score from a reference LM directory and calibration documents."""
    from prunefusion.checkpoints import digest_files
    from prunefusion.model_kinds import load_model

    lines = [line for text in texts for line in split_lines(text)]
    if not lines:
        raise ValueError("the calibration text has no non-empty lines")
    if max_lines is not None and len(lines) > max_lines:
        rng = np.random.default_rng(seed)
        lines = [lines[i] for i in sorted(rng.choice(len(lines), max_lines, replace=False))]
    model, tokenizer = load_model(Path(reference_model))
    model.to(device)
    weights, details = weights_from_nll(lines, line_nll(model, tokenizer, lines, batch_size=batch_size))
    if not any(weights.values()):
        raise ValueError(f"no filter lowers the reference LM's perplexity on this text (PPL_all "
                         f"{details['ppl_all']:.2f}): every weight would be 0; calibrate on more varied text")
    provenance = {"method": "sharma2024: w_i = max(0, (PPL_all - PPL_i) / PPL_all) over lines",
                  "reference_model": str(reference_model),
                  "reference_weights_digest": digest_files(sorted(Path(reference_model).glob("*.safetensors"))),
                  "data": data_description, "seed": seed,
                  "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **details}
    return Weights(weights, provenance)
