"""The torch engine's fast decode path: a KV cache in preallocated slots and a hand-written Llama-family step.

Layout: keys and values [layers, max_batch_size, kv heads, context_length, head dim], allocated once at start-up.
The batch's rows are slots 0..n-1 in the engine's row order; row b's real tokens fill positions 0..lengths[b]-1.
A decode step writes each row's new key and value in place at its own position and attends over the first W
columns only (W: the longest row rounded up to WINDOW_STEP), masking each row past its length: nothing is padded,
concatenated or re-allocated as rows join and leave. A joining row is *staged* in slot n (`stage`, optionally from
cached prefix blocks), its prompt appended there in one or more causal passes (`extend_logits`: chunked prefill,
between decode steps that leave it out), and `commit` makes it row n. (`join` copies a transformers prefill cache
into slot n instead: the benchmarks' and tests' way.) A leaving row's slot is refilled by moving the rows after it
down, keeping the order; a staged row moves down behind them.

The step uses the model's own modules (embeddings, norms, projections, rotary embedding, MLP) so weights, RoPE
scaling and pruned layer lists come from the checkpoint; only the attention and the cache are ours. Families whose
layers fit that shape are in FAST_FAMILIES; every other model, and one with a sliding window shorter than the
context, stays on kv_batch.py's transformers path (`refusal` says why). Measured on tiny-lm (16 rows, 2 threads):
1.28-1.40x the transformers step (benchmarks/decode_step_probe.py).

`compile` (config compile_decode) puts the decode-only pass through torch.compile once, with dynamic shapes, so one
graph serves every batch size and window. For that the cache is stored flat ([layers * rows * kv heads * context,
head dim]; `keys` / `values` are 5-d views of it) and each pass writes its keys and values with one `index_copy_`
per layer into that tensor itself: a write through a view of a graph input makes the compiled graph copy the whole
cache every step (measured: 10x slower than eager). Prefill and mixed passes stay eager.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # the same in all of FAST_FAMILIES

WINDOW_STEP = 64  # attention reads the first W columns, W a multiple of this (fewer distinct shapes)


@dataclass(frozen=True)
class FamilyShape:
    qk_norm: bool  # per-head RMSNorm of queries and keys before RoPE (Qwen3)


FAST_FAMILIES = {
    "llama": FamilyShape(qk_norm=False),
    "mistral": FamilyShape(qk_norm=False),
    "qwen2": FamilyShape(qk_norm=False),
    "qwen3": FamilyShape(qk_norm=True),
}


def refusal(model, context_length: int) -> str | None:
    """Why this model cannot take the slot path (None: it can)."""
    cfg = model.config
    if cfg.model_type not in FAST_FAMILIES:
        return f"family {cfg.model_type!r} has no slot decode step (known: {', '.join(sorted(FAST_FAMILIES))})"
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and window < context_length:
        return f"sliding_window {window} < context length {context_length}"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
        return "layers with attention other than full_attention"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        return "no model.model.rotary_emb / lm_head"
    return None


@dataclass(frozen=True)
class _Part:
    """Tokens for consecutive slots: input_ids [B, T] for slots first..first+B-1, row b's from position starts[b]."""
    input_ids: torch.Tensor
    first: int
    starts: torch.Tensor  # [B] long


class _View(NamedTuple):
    """A part as the layers see it, computed before the pass (tensors and one int only, so a compiled pass can take
    it): B rows from slot `first`, T new tokens each."""
    first: int
    positions: torch.Tensor  # [B, T]
    cache_rows: torch.Tensor  # [B * kv heads * T]: where its keys go in one layer's cache seen as [rows*kv*ctx, D]
    visible: torch.Tensor  # [B, 1, T, W] bool: the key columns each query sees (W: the columns read)


class SlotKV:
    """The batch's KV cache in slots; `decode_logits` runs one step of every row. See the module docstring."""

    def __init__(self, model, rows: int, context_length: int):
        cfg = model.config
        self.context_length = context_length
        self.shape = FAST_FAMILIES[cfg.model_type]
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.grouped = self.heads != self.kv_heads  # a bool, not an int comparison a compiled pass would trace
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        first = model.model.embed_tokens.weight
        self.layout = (len(model.model.layers), rows, self.kv_heads, context_length, self.head_dim)
        # stored flat, [layers * rows * kv heads * context, head dim]: a pass writes its keys with one index_copy_
        # into the tensor itself, which a compiled pass does in place (into a view of it, it copies the cache)
        self._key_rows = torch.zeros(math.prod(self.layout[:-1]), self.head_dim, dtype=first.dtype,
                                     device=first.device)
        self._value_rows = torch.zeros_like(self._key_rows)
        self.lengths: list[int] = []  # the decoding rows' tokens, slots 0..size-1
        self._staged: int | None = None
        self._compiled = None  # the decode-only pass, compiled by `compile`
        self.compiled_passes = 0

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def keys(self) -> torch.Tensor:
        """[layers, rows, kv heads, context, head dim], a view of the cache."""
        return self._key_rows.view(self.layout)

    @property
    def values(self) -> torch.Tensor:
        return self._value_rows.view(self.layout)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of one token, every layer."""
        return self.nbytes // (self.keys.shape[1] * self.context_length)

    @property
    def staged(self) -> int | None:
        """Tokens already in the staged slot (a prompt being prefilled in chunks), None when no row is staged."""
        return self._staged

    def compile(self, model, batch_sizes: list[int]) -> float:
        """Compile the decode-only pass (torch.compile, shapes dynamic) and run it once at each of these batch sizes
        (rows 0..B-1, which must be free: their keys are scribbled on), so no request pays for compiling; returns
        the seconds it took. Eager and compiled passes are the same code (`_pass`)."""
        assert not self.lengths and self._staged is None, "compile before any row joins"
        begin = time.perf_counter()
        compiled = torch.compile(self._pass, dynamic=True, fullgraph=True)
        device = self.keys.device
        for batch in batch_sizes:
            ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
            compiled(model, [ids], [self._view(_Part(ids, 0, torch.zeros(batch, dtype=torch.long, device=device)))])
        self._compiled = compiled
        return time.perf_counter() - begin

    def join(self, row_cache: DynamicCache, length: int) -> None:
        """Copy a batch-of-one prefill's cache (`length` tokens, no padding) into the next free slot."""
        assert self._staged is None, "a row is staged in the next free slot"
        row = self.size
        for index, layer in enumerate(row_cache.layers):
            self.keys[index, row, :, :length] = layer.keys[0, :, :length]
            self.values[index, row, :, :length] = layer.values[0, :, :length]
        self.lengths.append(length)

    def stage(self, prefix: list[tuple[torch.Tensor, torch.Tensor]] = ()) -> None:
        """Start a row in the slot after the decoding rows, from these cached prefix blocks (keys and values
        [layers, kv heads, block tokens, head dim] each, in order). It takes no part in decode steps until `commit`."""
        assert self._staged is None, "one row is staged at a time"
        slot, at = self.size, 0
        for keys, values in prefix:
            n = keys.shape[2]
            self.keys[:, slot, :, at:at + n] = keys
            self.values[:, slot, :, at:at + n] = values
            at += n
        self._staged = at

    def staged_block(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the staged row's keys and values at positions [start, end)."""
        assert self._staged is not None and end <= self._staged
        slot = self.size
        return self.keys[:, slot, :, start:end].clone(), self.values[:, slot, :, start:end].clone()

    def extend_logits(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """Append input_ids [1, T] to the staged row (causal within them); logits [1, V] of the last one."""
        (logits,) = self._forward(model, [self._staged_part(input_ids)])
        self._staged += input_ids.shape[1]
        return logits

    def decode_and_extend_logits(self, model, decode_ids: torch.Tensor, chunk_ids: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """`decode_logits(decode_ids)` and `extend_logits(chunk_ids)` in one forward pass: the norms, projections
        and MLPs run once over all their tokens (a mixed batch), only rotary embedding and attention per part."""
        decoded, extended = self._forward(model, [self._decode_part(decode_ids), self._staged_part(chunk_ids)])
        self.lengths = [n + 1 for n in self.lengths]
        self._staged += chunk_ids.shape[1]
        return decoded, extended

    def commit(self) -> None:
        """The staged row becomes the last decoding row."""
        assert self._staged is not None
        self.lengths.append(self._staged)
        self._staged = None

    def unstage(self) -> None:
        """Forget the staged row (its request ended or failed before its prefill finished)."""
        self._staged = None

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this (ascending) order: each moves down into the first free slot, and a staged
        row moves down behind them."""
        moves = [(new, old, self.lengths[old]) for new, old in enumerate(rows)]
        if self._staged is not None:
            moves.append((len(rows), self.size, self._staged))
        for new, old, n in moves:
            if new != old:
                self.keys[:, new, :, :n] = self.keys[:, old, :, :n]
                self.values[:, new, :, :n] = self.values[:, old, :, :n]
        self.lengths = [self.lengths[old] for old in rows]

    def decode_logits(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """One decode step of every row: input_ids [B, 1] -> logits [B, V]; each row's new key is stored."""
        (logits,) = self._forward(model, [self._decode_part(input_ids)])
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def _decode_part(self, input_ids: torch.Tensor) -> _Part:
        return _Part(input_ids, 0, torch.tensor(self.lengths, device=self.keys.device))

    def _staged_part(self, input_ids: torch.Tensor) -> _Part:
        assert self._staged is not None, "stage a row first"
        if self._staged + input_ids.shape[1] > self.context_length:
            raise ValueError(f"{self._staged + input_ids.shape[1]} tokens do not fit the context of "
                             f"{self.context_length}")
        return _Part(input_ids, self.size, torch.tensor([self._staged], device=self.keys.device))

    def _forward(self, model, parts: list[_Part]) -> list[torch.Tensor]:
        """Each part's rows (slots first..first+B-1) take its input_ids [B, T] at positions starts[b]..starts[b]+T-1,
        attending over their earlier tokens and causally among these; their keys and values are stored. Returns
        each part's logits [B, V] of its rows' last tokens. A decode-only pass runs compiled once `compile` ran."""
        views = [self._view(part) for part in parts]
        ids = [part.input_ids for part in parts]
        if self._compiled is not None and len(parts) == 1 and parts[0].input_ids.shape[1] == 1:  # decode only
            self.compiled_passes += 1
            return self._compiled(model, ids, views)
        return self._pass(model, ids, views)

    def _view(self, part: _Part) -> _View:
        batch, new = part.input_ids.shape
        device = part.starts.device
        positions = part.starts[:, None] + torch.arange(new, device=device)[None, :]  # [B, T]
        width = min(self.context_length, -(-(int(part.starts.max()) + new) // WINDOW_STEP) * WINDOW_STEP)
        visible = (torch.arange(width, device=device)[None, None, :] <= positions[:, :, None])[:, None]
        heads = torch.arange(part.first, part.first + batch, device=device)[:, None] * self.kv_heads + \
            torch.arange(self.kv_heads, device=device)[None, :]  # [B, kv]: (slot, head) pairs
        cache_rows = heads[:, :, None] * self.context_length + positions[:, None, :]  # [B, kv, T]
        return _View(part.first, positions, cache_rows.reshape(-1), visible)

    def _pass(self, model, ids: list[torch.Tensor], views: list[_View]) -> list[torch.Tensor]:
        """The forward pass itself (eager, or the compiled decode step): every part's tokens go through the norms,
        projections and MLPs together, as one [N, hidden] matrix; rotary embedding and attention per part."""
        lm = model.model
        xs = [lm.embed_tokens(part_ids) for part_ids in ids]  # [B, T, hidden] each
        rope = [lm.rotary_emb(x, view.positions) for x, view in zip(xs, views, strict=True)]
        flat = [x.reshape(-1, x.shape[-1]) for x in xs]
        x = torch.cat(flat) if len(flat) > 1 else flat[0]  # [N, hidden]
        for index, layer in enumerate(lm.layers):
            x = x + self._attention(layer, index, layer.input_layernorm(x), views, rope)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        lasts, at = [], 0
        for view in views:
            batch, new = view.positions.shape
            lasts.append(x[at:at + batch * new].view(batch, new, -1)[:, -1])
            at += batch * new
        logits = model.lm_head(lm.norm(torch.cat(lasts) if len(lasts) > 1 else lasts[0]))
        return list(logits.split([view.positions.shape[0] for view in views]))

    def _attention(self, layer, index: int, h: torch.Tensor, views: list[_View], rope: list) -> torch.Tensor:
        attn = layer.self_attn
        q_all, k_all, v_all = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        rows, _, context, dim = self.layout[1:]
        layer_rows = index * rows * self.kv_heads * context  # where layer `index` starts in the flat cache
        keys, values = self.keys[index], self.values[index]  # read through views; written in place below
        outs, at = [], 0
        for view, (cos, sin) in zip(views, rope, strict=True):
            batch, new = view.positions.shape
            n = batch * new
            q = q_all[at:at + n].view(batch, new, self.heads, dim)
            k = k_all[at:at + n].view(batch, new, self.kv_heads, dim)
            v = v_all[at:at + n].view(batch, new, self.kv_heads, dim)
            at += n
            if self.shape.qk_norm:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [B, H, T, D]
            # in place, on the whole cache (not a view of it), so a compiled pass writes in place too
            self._key_rows.index_copy_(0, view.cache_rows + layer_rows, k.reshape(-1, dim))
            self._value_rows.index_copy_(0, view.cache_rows + layer_rows, v.transpose(1, 2).reshape(-1, dim))
            width = view.visible.shape[-1]
            out = F.scaled_dot_product_attention(q, keys[view.first:view.first + batch, :, :width],
                                                 values[view.first:view.first + batch, :, :width],
                                                 attn_mask=view.visible, scale=attn.scaling,
                                                 enable_gqa=self.grouped)
            outs.append(out.transpose(1, 2).reshape(n, self.heads * dim))
        return attn.o_proj(torch.cat(outs) if len(outs) > 1 else outs[0])
