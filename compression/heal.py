"""`prunefusion compress heal`: repair a pruned model with QLoRA (Gromov et al., App. A.1), then merge it properly.

- Base weights in 4-bit NF4 through bitsandbytes (compute in float32 on CPU, bfloat16 on CUDA), or unquantized
  (`quantize=False`: plain LoRA). LoRA on the FFN projections by default, alpha = r, dropout 0.05, AdamW with a
  cosine schedule after warm-up, next-token loss on packed text.
- Checkpoints (adapter, optimizer, scheduler, RNG states, step) every N steps; a rerun resumes from the last one.
- Merge the right way: peft's merge on a 4-bit base would re-quantize it, so the base is reloaded unquantized, the
  adapter attached and merged, and the merged model's logits are checked against the unmerged adapter's.
- `full_finetune`: no adapter; every weight of the unquantized base is trained and saved as the result (nothing to
  merge). More capacity than LoRA, for small models (MiniLM 2-of-6 out of domain: benchmarks/RESULTS.md).

The loading, LoRA, training loop (`train_healing`), merge and plot are shared with encoder healing by distillation
(distill.py), which only brings its own batches and loss.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prunefusion.atomic import atomic_dir
from prunefusion.checkpoints import load_resume_state, load_tokenizer
from prunefusion.model_kinds import CAUSAL_LM, ModelKind

# FFN projection names per model family (the paper heals the FFN only); a list is matched by name suffix, a str is a
# regex peft fullmatches against the whole module path
FFN_TARGETS: dict[str, list[str] | str] = {
    **{f: ["gate_proj", "up_proj", "down_proj"] for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                                          "gemma3_text")},
    "phi3": ["gate_up_proj", "down_proj"],
    "gpt2": ["mlp.c_fc", "mlp.c_proj"],
    "gpt_neox": ["dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["fc1", "fc2"],
    # BERT-style encoders (MiniLM): layer.N.intermediate.dense and layer.N.output.dense. Not the suffix list
    # ["intermediate.dense", "output.dense"]: "output.dense" would also match layer.N.attention.output.dense
    "bert": r".*\.layer\.\d+\.(intermediate|output)\.dense",
}


@dataclass(frozen=True)
class HealConfig:
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    learning_rate: float = 3e-4  # the paper's default for 7B-class models; small models take more
    warmup_steps: int = 20
    rank: int = 8  # higher: more capacity, more memory
    dropout: float = 0.05
    targets: tuple[str, ...] | str | None = None  # default: FFN_TARGETS of the family; a str is a regex
    quantize: bool = True  # QLoRA (NF4 base); False: plain LoRA on the unquantized base
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "cpu"
    full_finetune: bool = False  # train every weight instead of a LoRA adapter (needs quantize: false)

    def __post_init__(self):
        if self.full_finetune and self.quantize:
            raise ValueError("heal.full_finetune trains every weight, and a 4-bit (NF4) base cannot be trained: set "
                             "heal.quantize: false")

    @property
    def method(self) -> str:
        """What is trained: "full" (every weight), "qlora" (an adapter on an NF4 base) or "lora"."""
        return "full" if self.full_finetune else "qlora" if self.quantize else "lora"


def _dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32  # bf16 is ~3.5x slower on these CPUs


def load_base(model_dir: Path, cfg: HealConfig, kind: ModelKind = CAUSAL_LM):
    """The base to train, loaded as its kind loads, NF4 when cfg.quantize."""
    from transformers import BitsAndBytesConfig

    kwargs: dict = dict(use_safetensors=True, local_files_only=True, dtype=_dtype(cfg.device))
    if cfg.quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=_dtype(cfg.device))
        kwargs["device_map"] = cfg.device
    model = kind.auto_model().from_pretrained(model_dir, **kwargs)
    return model if cfg.quantize else model.to(cfg.device)


def lora_model(base, cfg: HealConfig, kind: ModelKind = CAUSAL_LM):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = cfg.targets or FFN_TARGETS.get(base.config.model_type)
    if not targets:
        raise ValueError(f"no default LoRA targets for model type {base.config.model_type!r}; pass targets")
    if cfg.quantize:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, lora_dropout=cfg.dropout,
                        target_modules=targets if isinstance(targets, str) else list(targets),
                        task_type=kind.peft_task_type)
    return get_peft_model(base, config)


def trainable_model(base, cfg: HealConfig, kind: ModelKind = CAUSAL_LM):
    """What training updates: a LoRA adapter on the base (`lora_model`), or with cfg.full_finetune the base itself."""
    return base.requires_grad_(True) if cfg.full_finetune else lora_model(base, cfg, kind)


def save_result(model, cfg: HealConfig, model_dir: Path, out_dir: Path, tokenizer, kind: ModelKind = CAUSAL_LM
                ) -> dict:
    """After the last step: the adapter into out_dir/adapter, merged into out_dir/merged and checked (`merge`); a
    fully fine-tuned model straight into out_dir/merged (nothing to merge or check). Returns the merge record."""
    if not cfg.full_finetune:
        model.save_pretrained(out_dir / "adapter")
        return merge(model_dir, out_dir / "adapter", out_dir / "merged", tokenizer, cfg.device, kind)
    with atomic_dir(out_dir / "merged") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"full_finetune": True, "dtype": str(_dtype(cfg.device)).removeprefix("torch.")}


def _latest_checkpoint(root: Path) -> Path | None:
    """The last complete checkpoint: step-N/ with its state; never step-N.partial/ (a kill while it was written)."""
    done = sorted((p for p in root.glob("step-*") if p.name.removeprefix("step-").isdigit()
                   and (p / "state.pt").is_file()), key=lambda p: int(p.name.removeprefix("step-")))
    return done[-1] if done else None


def heal(model_dir: Path, out_dir: Path, texts: list[str], cfg: HealConfig = HealConfig(),
         stop_after_steps: int | None = None) -> dict:
    """Train (resuming from out_dir/checkpoints), save out_dir/adapter, merge into out_dir/merged.

    `stop_after_steps`: leave after this many steps in this run (checkpoints stay; a rerun resumes), for runs in
    time slices. Returns a summary with `steps_run` (steps done by this call) and, when finished, the merge check.
    """
    from prunefusion.models.build import pack_documents

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    checkpoints = out_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (out_dir / "heal_config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    tokenizer = load_tokenizer(model_dir)
    stream = pack_documents(tokenizer, texts)
    if stream.numel() <= cfg.seq_len + 1:
        raise ValueError(f"the healing text has {stream.numel()} tokens; need more than seq_len={cfg.seq_len}")
    torch.manual_seed(cfg.seed)
    model = trainable_model(load_base(model_dir, cfg), cfg)

    def next_loss(model, generator: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, stream.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=generator)
        batch = torch.stack([stream[s:s + cfg.seq_len] for s in starts.tolist()]).to(cfg.device)
        return model(input_ids=batch, labels=batch).loss

    summary = train_healing(model, cfg, checkpoints, next_loss, stop_after_steps)
    if summary["step"] < cfg.steps:
        return summary
    plot_losses(summary["losses"], out_dir / "heal_loss.png")
    summary["merge"] = save_result(model, cfg, model_dir, out_dir, tokenizer)
    return summary


def heal_pruned(pruned_dir: Path, original_dir: Path, out_dir: Path, texts: list[str], cfg: HealConfig,
                stop_after_steps: int | None = None) -> dict:
    """The causal-LM row of the model-kind table: next-token QLoRA needs no teacher (`original_dir` unused)."""
    return heal(pruned_dir, out_dir, texts, cfg, stop_after_steps)


def train_healing(model, cfg: HealConfig, checkpoints: Path,
               next_loss: Callable[[torch.nn.Module, torch.Generator], torch.Tensor],
               stop_after_steps: int | None = None, desc: str = "heal") -> dict:
    """The training loop heal() and distill() share: AdamW, cosine schedule after warm-up, gradients clipped at 1, a
    checkpoint every cfg.checkpoint_every steps and at the end; resumes from the last complete one in `checkpoints`.

    `next_loss(model, generator)` draws its batch with `generator` (its state is checkpointed) and returns the loss.
    Returns {"steps_run", "step", "resumed_from", "losses"}.
    """
    from transformers import get_cosine_schedule_with_warmup

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    step = 0
    resume = _latest_checkpoint(checkpoints)
    if resume is not None:
        state = load_resume_state(resume / "state.pt", remedy="Delete its step directory to resume from an earlier one")
        _load_trained(model, resume, cfg)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        step, losses = state["step"], state["losses"]
    start_step = step
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, unit="step")
    while step < cfg.steps and (stop_after_steps is None or step - start_step < stop_after_steps):
        loss = next_loss(model, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(model, cfg, optimizer, schedule, generator, step, losses, checkpoints)
    bar.close()
    return {"steps_run": step - start_step, "step": step, "resumed_from": start_step or None, "losses": losses}


def _save_trained(model, where: Path, cfg: HealConfig) -> None:
    """What training changed: the adapter (peft's files), or every weight (safetensors' save_model, which keeps
    tied weights once and loads them back)."""
    if cfg.full_finetune:
        from safetensors.torch import save_model

        save_model(model, str(where / "weights.safetensors"))
    else:
        model.save_pretrained(where)


def _load_trained(model, where: Path, cfg: HealConfig) -> None:
    from safetensors.torch import load_file, load_model

    if cfg.full_finetune:
        load_model(model, str(where / "weights.safetensors"))
    else:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(where / "adapter_model.safetensors"))


def _save_checkpoint(model, cfg: HealConfig, optimizer, schedule, generator, step, losses, root: Path) -> None:
    with atomic_dir(root / f"step-{step}") as tmp:  # a killed job never leaves a checkpoint that looks complete
        _save_trained(model, tmp, cfg)
        torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "data_rng": generator.get_state(), "torch_rng": torch.get_rng_state(), "step": step,
                    "losses": losses}, tmp / "state.pt")


@torch.no_grad()
def merge(model_dir: Path, adapter_dir: Path, out_dir: Path, tokenizer, device: str = "cpu",
          kind: ModelKind = CAUSAL_LM) -> dict:
    """Unquantized base + adapter -> merge_and_unload -> a plain checkpoint; check merged vs adapter outputs (the
    kind's output: logits, or an encoder's last hidden states)."""
    from peft import PeftModel

    base = kind.auto_model().from_pretrained(model_dir, dtype=_dtype(device), local_files_only=True)
    with_adapter = PeftModel.from_pretrained(base.to(device), adapter_dir).eval()
    ids = tokenizer(["The os module provides a portable way of using operating system functionality."] * 2,
                    return_tensors="pt")["input_ids"].to(device)
    adapter_out = with_adapter(input_ids=ids)[0].float()  # logits / last_hidden_state
    merged = with_adapter.merge_and_unload().eval()
    merged_out = merged(input_ids=ids)[0].float()
    max_diff = float((adapter_out - merged_out).abs().max())
    if not torch.allclose(adapter_out, merged_out, atol=1e-3, rtol=1e-3):
        raise RuntimeError(f"merged {kind.output} differ from the adapter's by up to {max_diff:.2e}")
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {kind.merge_check: max_diff, "dtype": str(_dtype(device)).removeprefix("torch.")}


def plot_losses(losses: list[float], path: Path, ylabel: str = "cross-entropy (nats/token)",
                title: str | None = None) -> None:
    """Loss per step and its running mean; the default title reports the final perplexity (next-token loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, alpha=0.4, lw=0.8, label="loss per step")
    ax.plot(range(1, len(losses) + 1), smooth, lw=1.5, label=f"{k}-step mean")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"healing (final {losses[-1]:.3f}, perplexity {math.exp(sum(losses[-k:]) / k):.1f})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
