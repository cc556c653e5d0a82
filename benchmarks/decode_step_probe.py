"""Where a batched decode step's time goes, and what a slot KV cache alone buys (issue 22, groundwork for part 1).

    .venv/bin/python benchmarks/decode_step_probe.py [--model DIR] [--batch 16] [--steps 64] [--rounds 3]
                                                      [--threads 2] [--profile]

Three decode steps over the same batch (`--batch` rows, prompts of 40-85 tokens, the same input token every step),
timed in interleaved rounds of `--steps` steps each:
  - `hf`:         the torch engine's step today: transformers' forward over a DynamicCache that grows by concatenation
                  each step, with a [B, S+1] mask and position ids (what server/engines/torch_engine.py calls);
  - `slot-sdpa`:  the same weights through a hand-written Llama-family forward over a preallocated slot cache
                  ([layers, rows, kv heads, max_len, head dim], new keys written in place, attention over the first
                  W columns, W rounded up to 64), attention by torch's scaled_dot_product_attention (enable_gqa);
  - `slot-matmul`: the same, with decode attention as two matmuls over the KV heads' query groups (no K/V copies).
Before timing, the slot forward's greedy tokens (a prompt prefilled into its slot, 30 decode steps) are compared
with transformers' `generate`: the script stops if they differ. `--profile` prints torch.profiler's top operators of
the slot-matmul step. Only Llama-family models (llama, mistral, qwen2) are supported: that is the probe's scope.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from prunefusion.home import default_model_dir

WINDOW_STEP = 64


class SlotForward:
    """A Llama-family forward over new tokens of rows [first, first + B) of a preallocated slot KV cache."""

    def __init__(self, model, rows: int, max_len: int, attention: str):
        cfg = model.config
        self.model, self.attention, self.max_len = model, attention, max_len
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (cfg.num_hidden_layers, rows, self.kv_heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=model.dtype)
        self.values = torch.zeros_like(self.keys)

    def __call__(self, tokens: torch.Tensor, first: int, starts: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] at positions starts[b] .. starts[b] + T - 1; returns the last position's logits [B, V]."""
        lm = self.model.model
        batch, new = tokens.shape
        x = lm.embed_tokens(tokens)
        positions = starts[:, None] + torch.arange(new)[None]  # [B, T]
        cos, sin = lm.rotary_emb(x, positions)
        width = min(self.max_len, -(-(int(positions.max()) + 1) // WINDOW_STEP) * WINDOW_STEP)
        visible = torch.arange(width)[None, None, :] <= positions[:, :, None]  # [B, T, W]
        rows = torch.arange(first, first + batch)[:, None]
        for index, layer in enumerate(lm.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(batch, new, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(batch, new, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(batch, new, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.keys[index][rows, :, positions] = k.transpose(1, 2)
            self.values[index][rows, :, positions] = v.transpose(1, 2)
            keys = self.keys[index, first:first + batch, :, :width]
            values = self.values[index, first:first + batch, :, :width]
            if self.attention == "matmul" and new == 1:
                grouped = q.view(batch, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
                scores = torch.matmul(grouped, keys.transpose(-1, -2)) * attn.scaling  # [B, KV, G, W]
                scores = scores.masked_fill(~visible.view(batch, 1, 1, width), float("-inf")).softmax(-1)
                out = torch.matmul(scores, values).view(batch, self.heads, 1, self.head_dim)
            else:
                out = torch.nn.functional.scaled_dot_product_attention(
                    q, keys, values, attn_mask=visible[:, None], scale=attn.scaling, enable_gqa=True)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, new, self.heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(lm.norm(x[:, -1:]))[:, -1]


def check_against_generate(model, prompt: torch.Tensor, tokens: int = 30) -> None:
    step = SlotForward(model, 1, prompt.shape[1] + tokens, "matmul")
    expected = model.generate(prompt, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens)
    got = [int(step(prompt, 0, torch.tensor([0])).argmax())]
    for position in range(prompt.shape[1], prompt.shape[1] + tokens - 1):
        got.append(int(step(torch.tensor([[got[-1]]]), 0, torch.tensor([position])).argmax()))
    if got != expected[0, prompt.shape[1]:].tolist():
        raise SystemExit(f"slot forward != generate:\n  {got}\n  {expected[0, prompt.shape[1]:].tolist()}")
    print(f"oracle: the slot forward's {tokens} greedy tokens equal transformers' generate")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=default_model_dir("tiny-lm"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed per engine per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--profile", action="store_true", help="print the slot-matmul step's top operators")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    if model.config.model_type not in ("llama", "mistral", "qwen2"):
        raise SystemExit(f"{args.model}: model_type {model.config.model_type!r}; the probe knows llama, mistral, qwen2")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (1, 40 + 3 * i), generator=gen) for i in range(args.batch)]
    step_input = torch.randint(3, model.config.vocab_size, (args.batch, 1), generator=gen)
    max_len = max(p.shape[1] for p in prompts) + args.steps * args.rounds + 21  # + 20 profiled steps
    with torch.inference_mode():
        check_against_generate(model, prompts[0])
        steps = {}
        for attention in ("sdpa", "matmul"):
            slot = SlotForward(model, args.batch, max_len, attention)
            for row, prompt in enumerate(prompts):
                slot(prompt, row, torch.tensor([0]))
            state = {"pos": torch.tensor([p.shape[1] for p in prompts])}

            def slot_step(slot=slot, state=state):
                slot(step_input, 0, state["pos"])
                state["pos"] = state["pos"] + 1
            steps[f"slot-{attention}"] = slot_step
        width = max(p.shape[1] for p in prompts)
        cache = DynamicCache()  # left-padded rows: the torch engine's layout (kv_batch.py)
        padded = torch.stack([torch.nn.functional.pad(p[0], (width - p.shape[1], 0)) for p in prompts])
        hf_state = {"mask": torch.stack([torch.nn.functional.pad(torch.ones(p.shape[1], dtype=torch.long),
                                                                 (width - p.shape[1], 0)) for p in prompts])}
        model(input_ids=padded, attention_mask=hf_state["mask"], past_key_values=cache, use_cache=True)

        def hf_step():
            mask = torch.nn.functional.pad(hf_state["mask"], (0, 1), value=1)
            model(input_ids=step_input, attention_mask=mask, position_ids=hf_state["mask"].sum(1, keepdim=True),
                  past_key_values=cache, use_cache=True)
            hf_state["mask"] = mask
        steps = {"hf": hf_step, **steps}
        times: dict[str, list[float]] = {name: [] for name in steps}
        for round_index in range(args.rounds):
            order = list(steps)[round_index % len(steps):] + list(steps)[:round_index % len(steps)]
            for name in order:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    steps[name]()
                times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
        print(f"batch {args.batch}, {args.steps} steps x {args.rounds} rounds, {args.threads} torch threads")
        for name, ms in times.items():
            ratios = [h / t for h, t in zip(times["hf"], ms, strict=True)]
            print(f"  {name:12s} {statistics.median(ms):6.2f} ms/step (rounds {' '.join(f'{t:.2f}' for t in ms)})"
                  f"  hf / this {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
        if args.profile:
            from torch.profiler import profile

            with profile() as prof:
                for _ in range(20):
                    steps["slot-matmul"]()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
