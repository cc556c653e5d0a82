"""`prunefusion models build`: train the default LM reproducibly on CPU and save an ordinary HF directory.

The directory is written under a temporary name and renamed into place at the end, so a killed build never
leaves a directory that looks finished.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prunefusion.atomic import atomic_dir
from prunefusion.checkpoints import weights_digest
from prunefusion.models.corpus import Corpus, stdlib_corpus
from prunefusion.models.recipes import RECIPES, LMRecipe
from prunefusion.models.tokenizer import train_bpe_tokenizer


def pack_documents(tokenizer, docs: list[str]) -> torch.Tensor:
    """One long stream: BOS doc EOS BOS doc EOS ... -> [N] long."""
    ids: list[int] = []
    # the backend tokenizer: whole documents are longer than the context, which is fine for packing. An earlier
    # padded/truncated call through transformers leaves those settings on the backend: clear them first.
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    for enc in backend.encode_batch(docs, add_special_tokens=True):
        ids.extend(enc.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping rows of seq_len tokens: [N // seq_len, seq_len]."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, batch_size: int = 16) -> float:
    """exp(mean next-token NLL) over every predicted token of the rows."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for i in range(0, rows.shape[0], batch_size):
        batch = rows[i:i + batch_size].to(next(model.parameters()).device)
        loss = model(input_ids=batch, labels=batch).loss
        n = batch.shape[0] * (batch.shape[1] - 1)
        total_nll += float(loss) * n
        total_tokens += n
    return math.exp(total_nll / max(total_tokens, 1))


def plot_loss(losses: list[float], eval_points: list[tuple[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, label="train loss (per step)")
    k = max(1, len(losses) // 50)
    smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1]) for i in range(len(losses))]
    ax.plot(range(1, len(losses) + 1), smooth, lw=1.5, label=f"train loss ({k}-step mean)")
    if eval_points:
        ax.plot(*zip(*eval_points, strict=True), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class BuildResult:
    path: Path
    manifest: dict


def build_model(recipe_name: str, out_dir: Path, *, steps: int | None = None, seed: int | None = None,
                corpus: Corpus | None = None, threads: int | None = None, force: bool = False,
                device: str = "cpu") -> BuildResult:
    """Train a recipe into `out_dir` (config.json + safetensors + tokenizer + manifest). `device` ("cpu", "cuda")
    is where training runs; the saved weights are the same format either way (float32)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

    if recipe_name not in RECIPES:
        raise ValueError(f"unknown recipe {recipe_name!r}; choose one of {sorted(RECIPES)}")
    recipe: LMRecipe = RECIPES[recipe_name]
    recipe = LMRecipe(**{**recipe.to_dict(), **({"steps": steps} if steps else {}),
                         **({"seed": seed} if seed is not None else {})})
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists; pass --force to rebuild it")
    if threads:
        torch.set_num_threads(threads)
    started = time.time()
    torch.manual_seed(recipe.seed)
    corpus = corpus or stdlib_corpus(recipe.held_out_every)

    with tqdm(total=3, desc="tokenizer + data", unit="stage") as bar:
        tokenizer = train_bpe_tokenizer(corpus.train, recipe.vocab_size, recipe.context_length)
        bar.update()
        train_stream = pack_documents(tokenizer, corpus.train)
        bar.update()
        held_rows = windows(pack_documents(tokenizer, corpus.held_out), recipe.seq_len)
        bar.update()

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads, max_position_embeddings=recipe.context_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True, rope_theta=10000.0)
    model = LlamaForCausalLM(config).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe.learning_rate,
                                  betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(optimizer, recipe.warmup_steps, recipe.steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    max_start = train_stream.numel() - recipe.seq_len - 1
    eval_rows = held_rows[:64]  # a fixed slice for the curve; the final number uses all held-out rows
    losses: list[float] = []
    eval_points: list[tuple[int, float]] = []
    eval_every = max(1, recipe.steps // 10)

    bar = tqdm(range(1, recipe.steps + 1), desc=f"train {recipe.name}", unit="step")
    for step in bar:
        model.train()
        starts = torch.randint(0, max_start, (recipe.batch_size,), generator=generator)
        batch = torch.stack([train_stream[s:s + recipe.seq_len] for s in starts.tolist()]).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % eval_every == 0 or step == recipe.steps:
            eval_points.append((step, math.log(perplexity(model, eval_rows))))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", held_out=f"{eval_points[-1][1]:.3f}")

    with tqdm(total=1, desc="held-out perplexity", unit="eval") as ebar:
        held_ppl = perplexity(model, held_rows)
        ebar.update()
    train_seconds = time.time() - started

    with atomic_dir(out_dir) as tmp:
        model.eval().to("cpu")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                         pad_token_id=config.pad_token_id).save_pretrained(tmp)
        plot_loss(losses, eval_points, tmp / "loss_curve.png", f"{recipe.name} LM on the stdlib corpus")
        manifest = {
            "kind": "prunefusion.lm",
            "recipe": recipe.to_dict(),
            "architecture": "LlamaForCausalLM",
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "corpus": {"description": corpus.description, "train_documents": len(corpus.train),
                       "held_out_documents": len(corpus.held_out), "characters": corpus.num_chars,
                       "train_tokens": int(train_stream.numel()), "held_out_tokens": int(held_rows.numel())},
            "training": {"steps": recipe.steps, "tokens_seen": recipe.steps * recipe.batch_size * recipe.seq_len,
                         "final_train_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": round(train_seconds, 1),
                         "torch_threads": torch.get_num_threads(), "device": device, "loss_curve": "loss_curve.png",
                         "held_out_curve": eval_points},
            "metrics": {"held_out_perplexity": held_ppl},
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                         "tokenizers": __import__("tokenizers").__version__},
            "weights_digest": weights_digest(tmp),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return BuildResult(out_dir, manifest)
