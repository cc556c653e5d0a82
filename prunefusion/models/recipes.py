"""Recipes for the project's own language models (a world without a model hub builds its models itself)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LMRecipe:
    """A small Llama-architecture LM and its byte-level BPE tokenizer, trained on the stdlib corpus."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # < num_heads: grouped-query attention, as in current Llama/Qwen checkpoints
    intermediate_size: int  # SwiGLU width, ~8/3 x hidden as in Llama
    context_length: int
    seq_len: int  # training sequence length (tokens per row)
    batch_size: int
    steps: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float = 0.1
    seed: int = 0
    held_out_every: int = 20  # 1 in N documents held out for perplexity

    def to_dict(self) -> dict:
        return asdict(self)


RECIPES: dict[str, LMRecipe] = {
    # The default served model: ~4.5M parameters, 8 layers (enough depth for layer pruning to have choices);
    # ~6-7 minutes on 2 CPU cores.
    "default": LMRecipe(name="default", vocab_size=4096, hidden_size=192, num_layers=8, num_heads=6, num_kv_heads=2,
                        intermediate_size=512, context_length=1024, seq_len=256, batch_size=8, steps=1000,
                        learning_rate=2e-3, warmup_steps=50),
    # One option away: wider and deeper, ~25M parameters; a GPU or a long CPU run.
    "large": LMRecipe(name="large", vocab_size=8192, hidden_size=384, num_layers=12, num_heads=6, num_kv_heads=2,
                      intermediate_size=1024, context_length=2048, seq_len=512, batch_size=16, steps=4000,
                      learning_rate=1e-3, warmup_steps=200),
    # Seconds, for tests and smoke runs: the same pipeline, a useless model.
    "pico": LMRecipe(name="pico", vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                     intermediate_size=128, context_length=256, seq_len=64, batch_size=4, steps=30,
                     learning_rate=3e-3, warmup_steps=5),
}
