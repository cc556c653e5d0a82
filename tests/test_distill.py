"""Encoder healing by distillation on a pico BERT: it raises the held-out cosine to the unpruned teacher, merges to a
plain checkpoint equal to the adapter, trains only the FFN, resumes after a kill; and `compress heal` picks it."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from prunefusion.compression.distill import (
    DistillConfig,
    distill,
    distill_loss,
    layer_wise_mse,
    mean_cosine,
    mean_pool,
    mean_pooled_embeddings,
    states_after_the_cut,
)
from prunefusion.compression.layers import prune_layers
from prunefusion.models.corpus import pydoc_topics

CFG = DistillConfig(steps=40, batch_size=16, seq_len=32, learning_rate=1e-2, warmup_steps=3, rank=8,
                    quantize=True, checkpoint_every=10)  # QLoRA: the NF4 path works for BertModel on CPU


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Pico models gain nothing from threads; on a busy machine, spinning threads make these tests ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sentences() -> list[str]:
    text = " ".join(" ".join(pydoc_topics()[:60]).split())
    return list(dict.fromkeys(s for s in re.split(r"(?<=\.)\s+", text) if 30 <= len(s) <= 160))


@pytest.fixture(scope="module")
def data():
    sentences = _sentences()
    return sentences[:400], sentences[400:520]  # train, held out (never trained on)


@pytest.fixture(scope="module")
def models(tmp_path_factory, data):
    """A 4-layer random BERT teacher (wide init: every layer matters) and the student: layers [1, 3) removed."""
    from pico import build_pico_bert

    root = tmp_path_factory.mktemp("distill")
    build_pico_bert(root / "teacher", data[0] + data[1])
    teacher, tokenizer = AutoModel.from_pretrained(root / "teacher"), AutoTokenizer.from_pretrained(root / "teacher")
    student, _ = prune_layers(teacher, 1, 3)
    student.save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    return root / "teacher", root / "student"


def held_cosine(model_dir, teacher_dir, held) -> float:
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = mean_pooled_embeddings(AutoModel.from_pretrained(teacher_dir), tokenizer, held)
    return mean_cosine(mean_pooled_embeddings(AutoModel.from_pretrained(model_dir), tokenizer, held), teacher)


@pytest.fixture(scope="module")
def healed(tmp_path_factory, models, data):
    teacher, student = models
    out = tmp_path_factory.mktemp("healed")
    return out, distill(student, teacher, out, data[0], CFG)


def test_mean_pooling_ignores_padding_and_is_normalized():
    states = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = mean_pool(states, mask)
    torch.testing.assert_close(pooled[0], torch.nn.functional.normalize(states[0, :3].mean(0), dim=0))
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(2))
    assert mean_cosine(pooled, pooled) == pytest.approx(1.0)
    assert mean_cosine(pooled, -pooled) == pytest.approx(-1.0)
    assert float(distill_loss(states, states, mask, token_weight=1.0)) == pytest.approx(0.0, abs=1e-6)
    other = states.clone()
    other[0, 3:] = 100.0  # padding positions: no effect on either term
    assert float(distill_loss(states, other, mask, token_weight=1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(states, torch.randn(2, 5, 8), mask, token_weight=0.0)) > 0.1


def test_embeddings_do_not_depend_on_the_batch(models, data):
    teacher_dir, _ = models
    model, tokenizer = AutoModel.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(teacher_dir)
    texts = data[1][:9]
    together = mean_pooled_embeddings(model, tokenizer, texts, batch_size=4)  # sorted by length, padded
    alone = torch.cat([mean_pooled_embeddings(model, tokenizer, [t]) for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_distillation_raises_the_held_out_cosine(healed, models, data):
    out, summary = healed
    teacher, student = models
    assert summary["steps_run"] == CFG.steps and summary["step"] == CFG.steps
    before = held_cosine(student, teacher, data[1])
    after = held_cosine(out / "merged", teacher, data[1])
    assert before < 0.9, before  # the pruning did damage
    assert after > before + 0.05 and after > 0.9, (before, after)
    assert (out / "heal_loss.png").stat().st_size > 10_000
    assert json.loads((out / "heal_config.json").read_text())["method"] == "distill"


def test_lora_wraps_the_ffn_only_and_the_merge_is_plain_and_equal_to_the_adapter(healed, models, data):
    from peft import PeftModel

    out, summary = healed
    _, student = models
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    wrapped = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in adapter}
    assert wrapped == {f"encoder.layer.{i}.{m}.dense" for i in range(2) for m in ("intermediate", "output")}
    weights = load_file(out / "merged" / "model.safetensors")
    assert not [k for k in weights if "lora" in k or "absmax" in k or "quant" in k]
    assert {t.dtype for t in weights.values()} == {torch.float32}
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    merged = AutoModel.from_pretrained(out / "merged")
    assert merged.config.num_hidden_layers == 2
    with_adapter = PeftModel.from_pretrained(AutoModel.from_pretrained(student), out / "adapter")
    texts = data[1][:16]
    torch.testing.assert_close(mean_pooled_embeddings(merged, tokenizer, texts),
                               mean_pooled_embeddings(with_adapter, tokenizer, texts), atol=1e-5, rtol=1e-4)
    unhealed = mean_pooled_embeddings(AutoModel.from_pretrained(student), tokenizer, texts)
    assert mean_cosine(mean_pooled_embeddings(merged, tokenizer, texts), unhealed) < 0.999  # healing changed it
    assert summary["merge"]["max_hidden_difference"] < 1e-3


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path, models, data, healed):
    teacher, student = models
    first = distill(student, teacher, tmp_path, data[0], CFG, stop_after_steps=12)  # killed after 12; checkpoint at 10
    assert first["steps_run"] == 12 and "merge" not in first and not (tmp_path / "merged").exists()
    second = distill(student, teacher, tmp_path, data[0], CFG)
    assert second["resumed_from"] == 10 and second["steps_run"] == CFG.steps - 10
    assert second["losses"][:10] == first["losses"][:10]
    # the same adapter as the uninterrupted run: optimizer, schedule, data order and dropout RNG were restored
    done = load_file(healed[0] / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert done.keys() == resumed.keys()
    for key in done:
        torch.testing.assert_close(resumed[key], done[key])


def test_plain_lora_and_a_teacher_that_does_not_fit(tmp_path, models, data):
    teacher, student = models
    cfg = DistillConfig(steps=4, batch_size=8, seq_len=32, warmup_steps=1, quantize=False, token_weight=1.0,
                        checkpoint_every=4)
    summary = distill(student, teacher, tmp_path / "plain", data[0], cfg)
    assert summary["merge"]["max_hidden_difference"] < 1e-4 and summary["merge"]["dtype"] == "float32"
    other = tmp_path / "other"
    config = AutoModel.from_pretrained(teacher).config
    config.hidden_size, config.intermediate_size = 16, 32
    transformers.BertModel(config).save_pretrained(other)
    with pytest.raises(ValueError, match="hidden_size"):
        distill(student, other, tmp_path / "bad", data[0], cfg)


def test_full_finetuning_trains_every_weight_resumes_and_refuses_a_4bit_base(tmp_path, models, data):
    teacher, student = models
    cfg = DistillConfig(steps=4, batch_size=8, seq_len=32, learning_rate=1e-3, warmup_steps=1, quantize=False,
                        full_finetune=True, checkpoint_every=2)
    with pytest.raises(ValueError, match="full_finetune.*quantize: false"):
        dataclasses.replace(cfg, quantize=True)
    summary = distill(student, teacher, tmp_path / "full", data[0], cfg)
    assert summary["merge"] == {"full_finetune": True, "dtype": "float32"}
    assert not (tmp_path / "full" / "adapter").exists()  # no adapter: the trained model is the result
    before = load_file(student / "model.safetensors")
    after = load_file(tmp_path / "full" / "merged" / "model.safetensors")
    # LoRA never touches the norms or the embeddings; full fine-tuning moves them too
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.output.LayerNorm.weight"):
        assert not torch.equal(before[name], after[name]), name
    # killed after 2 steps and rerun: the same weights as the uninterrupted run (optimizer, schedule, data RNG)
    distill(student, teacher, tmp_path / "resumed", data[0], cfg, stop_after_steps=2)
    assert not (tmp_path / "resumed" / "merged").exists()
    resumed = distill(student, teacher, tmp_path / "resumed", data[0], cfg)
    assert resumed["resumed_from"] == 2 and resumed["losses"] == summary["losses"]
    again = load_file(tmp_path / "resumed" / "merged" / "model.safetensors")
    for name in after:
        torch.testing.assert_close(again[name], after[name])


def test_states_after_the_cut_pair_each_kept_layer_with_the_one_it_was_copied_from():
    # MiniLM 2 of 6 ([2, 4) removed): the student's layers 2, 3 are the teacher's 4, 5; state i + 1 follows layer i
    assert states_after_the_cut([0, 1, 4, 5]) == {3: 5, 4: 6}
    assert states_after_the_cut([2, 3, 4, 5]) == {1: 3, 2: 4, 3: 5, 4: 6}  # the first block removed: every layer
    assert states_after_the_cut([0, 1, 2]) == {}  # the last block removed: nothing after the cut
    generator = torch.Generator().manual_seed(0)
    student = tuple(torch.randn(2, 5, 8, generator=generator) for _ in range(5))
    teacher = tuple(torch.randn(2, 5, 8, generator=generator) for _ in range(7))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    reference = []
    for s, t in ((3, 5), (4, 6)):  # the obvious way: a loop over the real tokens
        squared = [((student[s][b, i] - teacher[t][b, i]) ** 2).mean()
                   for b in range(2) for i in range(5) if mask[b, i]]
        reference.append(torch.stack(squared).mean())
    assert torch.allclose(layer_wise_mse(student, teacher, mask, {3: 5, 4: 6}), torch.stack(reference).mean())


def test_the_layer_wise_term_adds_to_the_loss_and_needs_the_prune_manifest(tmp_path, models, data):
    teacher, student = models
    cfg = DistillConfig(steps=3, batch_size=8, seq_len=32, warmup_steps=1, quantize=False, checkpoint_every=10)
    layer_cfg = dataclasses.replace(cfg, layer_weight=4.0)
    with pytest.raises(ValueError, match="layer_weight.*manifest.json"):
        distill(student, teacher, tmp_path / "no-manifest", data[0], layer_cfg)
    with_manifest = tmp_path / "student"
    with_manifest.mkdir()
    for item in student.iterdir():
        (with_manifest / item.name).write_bytes(item.read_bytes())
    _, record = prune_layers(AutoModel.from_pretrained(teacher), 1, 3)
    (with_manifest / "manifest.json").write_text(json.dumps(record))
    plain = distill(with_manifest, teacher, tmp_path / "plain", data[0], cfg)
    layer_wise = distill(with_manifest, teacher, tmp_path / "layer-wise", data[0], layer_cfg)
    # the same seed draws the same first batch: the difference is the layer-wise term (the pico student's state
    # after its layer 1, the teacher's layer 3, differs from the teacher's)
    assert layer_wise["losses"][0] > plain["losses"][0] + 1e-3
    assert json.loads((tmp_path / "layer-wise" / "heal_config.json").read_text())["layer_weight"] == 4.0


def _heal(*argv: str) -> int:
    from prunefusion.cli import main

    return main(["compress", "heal", *argv])


def test_compress_heal_distills_encoders_and_needs_the_teacher(tmp_path, models, data, capsys):
    teacher, student = models
    texts = tmp_path / "sentences.jsonl"
    texts.write_text("\n".join(json.dumps({"text": t}) for t in data[0]) + "\n")
    common = ["--model", str(student), "--data", str(texts), "--steps", "3", "--warmup", "1", "--checkpoint-every", "3"]
    assert _heal(*common, "--out", str(tmp_path / "none")) == 2
    assert "--teacher" in capsys.readouterr().err
    assert _heal(*common, "--out", str(tmp_path / "healed"), "--teacher", str(teacher)) == 0
    assert "distilled" in capsys.readouterr().out
    config = json.loads((tmp_path / "healed" / "heal_config.json").read_text())
    # the encoder's defaults, not the causal LM's: plain LoRA, 32 sentences of up to 128 tokens
    assert config["method"] == "distill" and config["batch_size"] == 32 and config["seq_len"] == 128
    assert config["quantize"] is False and config["steps"] == 3
    assert AutoModel.from_pretrained(tmp_path / "healed" / "merged").config.num_hidden_layers == 2
    assert _heal(*common, "--out", str(tmp_path / "full"), "--teacher", str(teacher), "--full-finetune") == 0
    assert "every weight trained, nothing to merge" in capsys.readouterr().out
    assert json.loads((tmp_path / "full" / "heal_config.json").read_text())["full_finetune"] is True
    assert not (tmp_path / "full" / "adapter").exists() and (tmp_path / "full" / "merged" / "config.json").is_file()
