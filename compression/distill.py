"""`prunefusion compress heal` for encoders: heal a pruned BERT-style encoder (MiniLM) by distillation toward the
unpruned model's sentence embeddings.

- Sentence embedding = the mean of the last hidden states over the attention mask, L2-normalized: what
  sentence-transformers' Pooling(mean) + Normalize compute for all-MiniLM-L6-v2.
- Loss per batch: 1 - cos(student, teacher) averaged over sentences, plus `token_weight` x the mean squared error
  between the student's and the teacher's last hidden states over real tokens, plus `layer_weight` x the mean of
  that MSE over the states after each student layer past the cut and the teacher's after the layer it was copied
  from (layer-wise distillation: the pairing comes from the pruned model's manifest.json, `kept`). The teacher runs
  in eval mode, under no_grad, on the same batch.
- Everything else is heal.py's: NF4 base (QLoRA) or plain LoRA, LoRA on the FFN (`FFN_TARGETS["bert"]`: a regex for
  layer.N.intermediate.dense and layer.N.output.dense, because the suffix "output.dense" also names
  attention.output.dense), alpha = r, dropout 0.05, AdamW with a cosine schedule after warm-up, checkpoints and
  resume (`train_healing`), the merge into an unquantized plain checkpoint checked against the adapter's outputs, the
  loss plot; or, with `full_finetune`, every weight of the student trained (no adapter, nothing to merge).
- The student's own dropout (hidden and attention, 0.1 in MiniLM) is off while training unless `encoder_dropout`:
  the target is the deterministic teacher. LoRA's dropout stays.
- Plain LoRA by default (`quantize=False`), unlike heal.py: the full-precision teacher sits in memory anyway, encoders
  of this size are small, NF4 alone moves all-MiniLM-L6-v2's embeddings to a mean cosine of 0.974 with the original
  (so an adapter trained on it is merged onto a base it did not see), and bitsandbytes' 4-bit CPU path is slow.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from prunefusion.checkpoints import load_tokenizer
from prunefusion.compression.heal import HealConfig, load_base, plot_losses, save_result, train_healing, trainable_model
from prunefusion.model_kinds import ENCODER


@dataclass(frozen=True)
class DistillConfig(HealConfig):
    steps: int = 300
    batch_size: int = 32  # sentences
    seq_len: int = 128  # tokens per sentence, truncated
    learning_rate: float = 3e-3
    quantize: bool = False  # True: QLoRA as in heal.py
    token_weight: float = 0.0  # > 0: add the MSE between token states to 1 - cosine
    layer_weight: float = 0.0  # > 0: add the mean MSE between the states after each layer past the cut
    encoder_dropout: bool = False  # keep the student's own dropout while training


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, D] hidden states, [B, T] attention mask -> [B, D] L2-normalized mean over the real tokens."""
    weights = mask.to(states.dtype).unsqueeze(-1)
    summed = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(summed, dim=-1)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def mean_pooled_embeddings(model: torch.nn.Module, tokenizer, texts: list[str], batch_size: int = 64,
                           max_length: int = 256) -> torch.Tensor:
    """[N, D] float32 sentence embeddings (mean pooling, normalized) in the order of `texts`. Texts are batched by
    length, so there is little padding; `max_length` is all-MiniLM-L6-v2's max_seq_length."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        enc = tokenizer([texts[r] for r in rows], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt").to(_device(model))
        out[rows] = mean_pool(model(**enc)[0].float(), enc["attention_mask"]).cpu()
    model.train(was_training)
    return out


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of cos(a_i, b_i); [N, D] x [N, D]."""
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def state_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean squared error between [B, T, D] hidden states over the real tokens of the [B, T] mask."""
    weights = mask.to(student.dtype).unsqueeze(-1)
    return ((student - teacher) ** 2 * weights).sum() / (weights.sum() * student.shape[-1])


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, token_weight: float = 0.0
                 ) -> torch.Tensor:
    """1 - mean cos(pooled student, pooled teacher), + token_weight x the MSE of the token states (real tokens)."""
    cos = (mean_pool(student, mask) * mean_pool(teacher, mask)).sum(dim=-1)
    loss = 1.0 - cos.mean()
    if token_weight:
        loss = loss + token_weight * state_mse(student, teacher, mask)
    return loss


def states_after_the_cut(kept: list[int]) -> dict[int, int]:
    """Student hidden-state index -> the teacher's it stands for, for every student layer after the first gap in
    `kept` (the teacher's layer indices the student kept, in order). Index 0 is the embeddings, index i + 1 the
    output of layer i: the student's layer j is the teacher's layer kept[j]."""
    cut = next((j for j, layer in enumerate(kept) if layer != j), len(kept))
    return {j + 1: kept[j] + 1 for j in range(cut, len(kept))}


def layer_wise_mse(student_states: tuple[torch.Tensor, ...], teacher_states: tuple[torch.Tensor, ...],
                   mask: torch.Tensor, pairs: dict[int, int]) -> torch.Tensor:
    """The mean over `pairs` (student state index -> teacher's) of the states' MSE over real tokens."""
    return sum(state_mse(student_states[s].float(), teacher_states[t].float(), mask)
               for s, t in pairs.items()) / len(pairs)


def _layer_pairs(student_dir: Path) -> dict[int, int]:
    manifest = student_dir / "manifest.json"
    if not manifest.is_file():
        raise ValueError(f"heal.layer_weight pairs the student's layers with the teacher's by the pruned model's "
                         f"manifest.json, and {manifest} is missing (`prunefusion compress prune` writes it)")
    pairs = states_after_the_cut(json.loads(manifest.read_text())["kept"])
    if not pairs:
        raise ValueError(f"heal.layer_weight: {manifest} keeps no layer after a removed one (the cut is at the end)")
    return pairs


def _load_teacher(teacher_dir: Path, student_config, device: str):
    teacher = ENCODER.auto_model().from_pretrained(teacher_dir, use_safetensors=True, local_files_only=True,
                                        dtype=torch.float32).to(device).eval()
    for name in ("model_type", "hidden_size", "vocab_size"):
        if getattr(teacher.config, name) != getattr(student_config, name):
            raise ValueError(f"teacher and student differ in {name}: {getattr(teacher.config, name)} vs "
                             f"{getattr(student_config, name)}; the teacher is the unpruned model")
    teacher.requires_grad_(False)
    return teacher


def distill(student_dir: Path, teacher_dir: Path, out_dir: Path, texts: list[str],
            cfg: DistillConfig = DistillConfig(), stop_after_steps: int | None = None) -> dict:
    """Train the pruned `student_dir` toward `teacher_dir`'s embeddings of `texts` (resuming from
    out_dir/checkpoints), save out_dir/adapter, merge into out_dir/merged, plot out_dir/heal_loss.png.

    `stop_after_steps`: leave after this many steps in this run (checkpoints stay; a rerun resumes). Returns
    {"steps_run", "step", "resumed_from", "losses"} and, when finished, "merge" (max_hidden_difference).
    """
    student_dir, teacher_dir, out_dir = Path(student_dir), Path(teacher_dir), Path(out_dir)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("no text to distill on")
    checkpoints = out_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (out_dir / "heal_config.json").write_text(
        json.dumps({"method": "distill", "teacher": str(teacher_dir), **asdict(cfg)}, indent=1) + "\n")
    tokenizer = load_tokenizer(student_dir)
    torch.manual_seed(cfg.seed)
    model = trainable_model(load_base(student_dir, cfg, ENCODER), cfg, ENCODER)
    if not cfg.encoder_dropout:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name:
                module.p = 0.0  # BERT's attention reads its dropout's p too
    teacher = _load_teacher(teacher_dir, model.config, cfg.device)
    pairs = _layer_pairs(student_dir) if cfg.layer_weight else {}

    def next_loss(model, generator: torch.Generator) -> torch.Tensor:
        rows = torch.randint(0, len(texts), (cfg.batch_size,), generator=generator).tolist()
        enc = tokenizer([texts[r] for r in rows], truncation=True, max_length=cfg.seq_len, padding=True,
                        return_tensors="pt").to(cfg.device)
        with torch.no_grad():
            target = teacher(**enc, output_hidden_states=bool(pairs))
        got = model(**enc, output_hidden_states=bool(pairs))
        mask = enc["attention_mask"]
        loss = distill_loss(got[0].float(), target[0].float(), mask, cfg.token_weight)
        if pairs:
            loss = loss + cfg.layer_weight * layer_wise_mse(got.hidden_states, target.hidden_states, mask, pairs)
        return loss

    summary = train_healing(model, cfg, checkpoints, next_loss, stop_after_steps, desc="distill")
    if summary["step"] < cfg.steps:
        return summary
    losses = summary["losses"]
    plot_losses(losses, out_dir / "heal_loss.png", ylabel="1 - cos(student, teacher)" +
                (f" + {cfg.token_weight} x token MSE" if cfg.token_weight else "") +
                (f" + {cfg.layer_weight} x layer MSE" if cfg.layer_weight else ""),
                title=f"distillation toward the unpruned encoder (final loss {losses[-1]:.4f})")
    summary["merge"] = save_result(model, cfg, student_dir, out_dir, tokenizer, ENCODER)
    return summary


def heal_pruned(pruned_dir: Path, original_dir: Path, out_dir: Path, texts: list[str], cfg: DistillConfig,
                stop_after_steps: int | None = None) -> dict:
    """The encoder row of the model-kind table: distillation toward the unpruned original."""
    return distill(pruned_dir, original_dir, out_dir, texts, cfg, stop_after_steps)
