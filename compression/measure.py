"""`prunefusion compress measure`: one forward pass over a calibration set fills the whole distance table.

Forward pre-hooks record every block's input x^0..x^{L-1}; a forward hook records the last block's output x^L
(before the final norm; `output_hidden_states` would give it after the norm in many models). Per batch, every
pair (l, l + n) is reduced at once and added to running sums, so memory does not grow with the calibration set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from prunefusion.compression.angular import (
    best_block,
    block_influence,
    pairwise_angular,
    pairwise_angular_tokens,
    table_from_pairs,
)
from prunefusion.compression.layers import find_layers


@dataclass
class DistanceTable:
    num_layers: int
    samples: int
    last_token: dict[int, list[float]]  # n -> [d(l, n) for l = 0..L-n], last real token (paper default)
    all_tokens: dict[int, list[float]]  # same, averaged over every real token
    block_influence: list[float]  # ShortGPT BI per layer
    meta: dict = field(default_factory=dict)

    def best(self, n: int, variant: str = "last_token", allow_last: bool = False) -> tuple[int, float]:
        return best_block(getattr(self, variant), n, allow_last)

    def to_json(self) -> dict:
        best = {}
        for n in range(1, self.num_layers - 1):  # sizes that leave the first and the final layer
            best[n] = dict(zip(("start", "distance"), self.best(n), strict=True))
        return {"num_layers": self.num_layers, "samples": self.samples, "last_token": self.last_token,
                "all_tokens": self.all_tokens, "block_influence": self.block_influence, "best_last_token": best,
                **self.meta}

    @classmethod
    def from_json(cls, data: dict) -> DistanceTable:
        def table(t):
            return {int(n): v for n, v in t.items()}

        return cls(data["num_layers"], data["samples"], table(data["last_token"]), table(data["all_tokens"]),
                   data["block_influence"])


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.inference_mode()
def measure(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], total: int | None = None
            ) -> DistanceTable:
    """batches: dicts with input_ids and attention_mask [B, T] (any padding side)."""
    _, layers = find_layers(model)
    num_layers = len(layers)
    captured: list[torch.Tensor | None] = [None] * (num_layers + 1)
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(
            lambda _m, args, kwargs, i=i: captured.__setitem__(i, _hidden(args, kwargs)), with_kwargs=True))
    handles.append(layers[-1].register_forward_hook(
        lambda _m, _args, out: captured.__setitem__(num_layers, out[0] if isinstance(out, tuple) else out)))
    positions = num_layers + 1
    last_sum = torch.zeros(positions, positions, dtype=torch.float64)
    token_sum = torch.zeros_like(last_sum)
    bi_sum = torch.zeros(num_layers, dtype=torch.float64)
    samples = 0
    model.eval()
    try:
        for batch in tqdm(batches, total=total, desc="measure", unit="batch"):
            mask = batch["attention_mask"]
            model(**batch)
            states = torch.stack([s.float().cpu() for s in captured])  # [P, B, T, D]
            mask = mask.cpu()
            # the last real token of each row, whatever the padding side
            last = mask.shape[1] - 1 - torch.flip(mask, dims=[1]).argmax(dim=1)
            rows = torch.arange(mask.shape[0])
            last_sum += pairwise_angular(states[:, rows, last]).sum(dim=0)
            token_sum += pairwise_angular_tokens(states, mask).sum(dim=0)
            bi_sum += block_influence(states, mask).sum(dim=0)
            samples += mask.shape[0]
            captured[:] = [None] * positions
    finally:
        for handle in handles:
            handle.remove()
    if samples == 0:
        raise ValueError("the calibration set is empty")
    return DistanceTable(num_layers, samples, table_from_pairs(last_sum / samples),
                         table_from_pairs(token_sum / samples), (bi_sum / samples).tolist())


def tokenized_batches(tokenizer, texts: list[str], seq_len: int, batch_size: int
                      ) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of at most seq_len tokens per text."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], truncation=True, max_length=seq_len, padding=True,
                        return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out
