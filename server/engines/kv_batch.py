"""A left-padded batch of KV caches that rows can join and leave between decode steps.

Layout: every layer holds keys/values [B, H, S, D]; row b's real tokens occupy the last `lengths[b]` of the S slots,
the slots before them are padding, masked out by `mask` [B, S] (1 = real token). A joining row (prefilled alone,
so its prefill is exactly a batch-of-one forward) is left-padded to the batch's S, or the batch is left-padded to
its length. Leaving rows are dropped and the padding column prefix that no row needs any more is trimmed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def _left_pad(t: torch.Tensor, to_length: int, dim: int) -> torch.Tensor:
    missing = to_length - t.shape[dim]
    if missing <= 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]  # F.pad lists the last dimension first
    return F.pad(t, pad)


class BatchedKV:
    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, S] long

    @property
    def size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def next_positions(self) -> torch.Tensor:
        """[B, 1] position id of each row's next token (its count of real tokens)."""
        assert self.mask is not None
        return self.mask.sum(dim=1, keepdim=True)

    def decode_mask(self) -> torch.Tensor:
        """[B, S + 1] attention mask for a decode step that appends one token per row."""
        assert self.mask is not None
        return F.pad(self.mask, (0, 1), value=1)

    def after_decode(self, mask: torch.Tensor) -> None:
        """Record the token every row appended in the last decode step; `mask` is the decode_mask() it used."""
        self.mask = mask

    def decode_logits(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """One decode step of every row through transformers' forward: input_ids [B, 1] -> logits [B, V]."""
        mask = self.decode_mask()
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=self.next_positions(),
                       past_key_values=self.cache, use_cache=True).logits[:, -1]
        self.after_decode(mask)
        return logits

    def join(self, row_cache: DynamicCache, length: int) -> None:
        """Append one row whose cache holds `length` real tokens and no padding."""
        row_mask = torch.ones(1, length, dtype=torch.long, device=row_cache.layers[0].keys.device)
        if self.cache is None:
            self.cache, self.mask = row_cache, row_mask
            return
        width = max(self.width, length)
        for layer, row_layer in zip(self.cache.layers, row_cache.layers, strict=True):
            layer.keys = torch.cat([_left_pad(layer.keys, width, 2), _left_pad(row_layer.keys, width, 2)])
            layer.values = torch.cat([_left_pad(layer.values, width, 2), _left_pad(row_layer.values, width, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(row_mask, width, 1)])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order) and trim padding columns that no remaining row uses."""
        if not rows:
            self.cache, self.mask = None, None
            return
        assert self.cache is not None and self.mask is not None
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[index]
        start = int(self.width - mask.sum(dim=1).max())  # columns before this are padding in every row
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
