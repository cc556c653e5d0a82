"""The kinds of checkpoint the project prunes, heals, evaluates and serves, in one table: causal LMs and bare
encoders (BERT-style, e.g. all-MiniLM-L6-v2). Each kind says how it loads, what its output is, what text it gets by
default, and how a pruned one is healed and evaluated; callers look the kind up instead of branching on it.

Heal and evaluation functions are named as "module:function" and imported when used (prunefusion.lazy.resolve, as
vLLM's model registry does), so reading this table imports neither transformers' models nor the compression stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class ModelKind:
    name: str  # "causal-lm" | "encoder" (also the ONNX export's task)
    causal: bool  # decodes left to right (a KV cache to switch off when tracing; perplexity is its measure)
    auto_class: str  # the transformers Auto class that loads it
    output: str  # what its forward returns first: logits, or the last hidden states
    peft_task_type: str  # peft's LoRA task type
    text_unit: str  # what the default corpus gives it: "documents" | "sentences" (prunefusion.texts)
    heal_method: str  # in words, for reports
    heals_toward_original: bool  # healing needs the unpruned model (a teacher), not just text
    healed: str  # the verb the heal command reports: "healed" | "distilled"
    merge_check: str  # the merge stage's check: max difference of `output`, merged vs adapter
    heal_config: str  # "module:Class" of the healing config (frozen dataclass)
    heal: str  # "module:function" (pruned_dir, original_dir, out_dir, texts, cfg, stop_after_steps) -> summary dict
    evaluate: str  # "module:function" (model_dirs, held_out, task) -> one row dict per model

    def auto_model(self):
        import transformers

        return getattr(transformers, self.auto_class)

    def load(self, model_dir: Path, **kwargs):
        """(model in eval mode, tokenizer), offline, safetensors only. A missing tokenizer fails before any weights
        are read."""
        from prunefusion.checkpoints import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
        model = self.auto_model().from_pretrained(model_dir, use_safetensors=True, local_files_only=True, **kwargs)
        return model.eval(), tokenizer

    def texts(self, paths: list[str], split: str) -> list[str]:
        """The text in `paths` (`local:` sources in this kind's unit); none given: the stdlib corpus' `split` in this
        kind's unit."""
        from prunefusion.texts import default_texts, load_texts

        return load_texts(paths, self.text_unit) if paths else default_texts(self.text_unit, split)


CAUSAL_LM = ModelKind(
    name="causal-lm", causal=True, auto_class="AutoModelForCausalLM", output="logits", peft_task_type="CAUSAL_LM",
    text_unit="documents", heal_method="QLoRA on next-token loss", heals_toward_original=False, healed="healed",
    merge_check="max_logit_difference",
    heal_config="prunefusion.compression.heal:HealConfig", heal="prunefusion.compression.heal:heal_pruned",
    evaluate="prunefusion.compression.evaluate:evaluate_causal_lms")
ENCODER = ModelKind(
    name="encoder", causal=False, auto_class="AutoModel", output="last_hidden_state",
    peft_task_type="FEATURE_EXTRACTION", text_unit="sentences",
    heal_method="distillation toward the original's embeddings", heals_toward_original=True, healed="distilled",
    merge_check="max_hidden_difference", heal_config="prunefusion.compression.distill:DistillConfig",
    heal="prunefusion.compression.distill:heal_pruned", evaluate="prunefusion.compression.evaluate:evaluate_encoders")
MODEL_KINDS = {kind.name: kind for kind in (CAUSAL_LM, ENCODER)}


def kind_of(config) -> ModelKind:
    """A transformers config's kind: a causal LM when an architecture ends in ForCausalLM / LMHeadModel."""
    causal = any(a.endswith(CAUSAL_SUFFIXES) for a in (config.architectures or []))
    return next(kind for kind in MODEL_KINDS.values() if kind.causal == causal)


def checkpoint_kind(model_dir: Path) -> ModelKind:
    from transformers import AutoConfig

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    return kind_of(AutoConfig.from_pretrained(model_dir, local_files_only=True))


def load_model(model_dir: Path):
    """(model, tokenizer) of a checkpoint as its kind loads it."""
    return checkpoint_kind(model_dir).load(Path(model_dir))
