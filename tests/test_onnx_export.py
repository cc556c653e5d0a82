"""ONNX export of pruned checkpoints: onnxruntime matches torch on fresh inputs; failures are clear and atomic."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers
from pico import pico_family_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from prunefusion.compression.layers import prune_layers
from prunefusion.compression.onnx_export import (
    ExportMismatch,
    consolidate_external_data,
    export_onnx,
)

# not the export's own verification inputs (random ids, shapes [1, 5], [3, 16], [1, 1]): real text, batch 4
TEXTS = ["The os module provides a portable way of using operating system dependent functionality.",
         "Lists are mutable sequences.", "x",
         "The with statement is used to wrap the execution of a block with methods defined by a context manager."]


@pytest.fixture(scope="module")
def tokenizer(pico_dir):
    return AutoTokenizer.from_pretrained(pico_dir)


def save_pruned(model, tokenizer, path):
    pruned, _ = prune_layers(model, 0, 1)
    pruned.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pruned_llama(tokenizer, tmp_path_factory):
    return save_pruned(pico_family_model("llama", tokenizer, layers=3), tokenizer,
                       tmp_path_factory.mktemp("onnx") / "llama-pruned")


def fresh_batch(tokenizer):
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert batch["attention_mask"].min() == 0 and batch["input_ids"].shape[1] > 16  # padded, longer than verified
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def run_onnx(out, feeds) -> np.ndarray:
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


def assert_matches(actual, expected, mask, atol=1e-4):
    assert actual.shape == expected.shape
    keep = mask.numpy().astype(bool)
    assert np.abs(actual - expected)[keep].max() <= atol


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pruned_causal_lm_logits_match_torch(family, tokenizer, pruned_llama, tmp_path):
    source = pico_family_model(family, tokenizer, layers=3)
    model_dir = pruned_llama if family == "llama" else save_pruned(source, tokenizer, tmp_path / "pruned")
    out = tmp_path / "onnx"
    summary = export_onnx(model_dir, out)
    assert summary["task"] == "causal-lm" and summary["outputs"] == ["logits"] and summary["opset"] == 18
    assert summary["max_abs_difference"] <= 1e-4 and summary["size_bytes"] == (out / "model.onnx").stat().st_size
    assert json.loads((out / "onnx_export.json").read_text()) == summary
    assert not out.with_name("onnx.partial").exists()

    reloaded = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert reloaded.config.num_hidden_layers == 2
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 2  # the config travels too
    feeds = fresh_batch(AutoTokenizer.from_pretrained(out))  # the tokenizer travels with the graph
    with torch.no_grad():
        expected = reloaded(**feeds).logits.numpy()
        unpruned = source(**feeds).logits.numpy()
    actual = run_onnx(out, feeds)
    assert_matches(actual, expected, feeds["attention_mask"])
    assert np.abs(actual - unpruned).max() > 0.1  # the graph is the pruned model, not the original


def test_pruned_bert_encoder_hidden_states_match_torch(tokenizer, tmp_path):
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3,
                                     num_attention_heads=4, intermediate_size=64, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model_dir = save_pruned(transformers.BertModel(config).eval(), tokenizer, tmp_path / "bert-pruned")
    out = tmp_path / "onnx"
    summary = export_onnx(model_dir, out, opset=14)
    assert summary["task"] == "encoder" and summary["outputs"] == ["last_hidden_state"] and summary["opset"] == 14

    reloaded = AutoModel.from_pretrained(model_dir).eval()
    feeds = fresh_batch(tokenizer)
    with torch.no_grad():
        expected = reloaded(**feeds).last_hidden_state.numpy()
    assert_matches(run_onnx(out, feeds), expected, feeds["attention_mask"])


def cli(argv: list[str]) -> int:
    from prunefusion.cli import main

    return main(["compress", "export-onnx", *argv])


def test_bad_input_is_one_clear_line(pruned_llama, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        export_onnx(tmp_path / "missing", tmp_path / "out")
    assert cli(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing: not a model directory" in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="opset 13 is not supported"):
        export_onnx(pruned_llama, tmp_path / "out", opset=13)
    for out in (pruned_llama, pruned_llama.parent):  # --force would delete the model being exported
        with pytest.raises(ValueError, match="would replace the model"):
            export_onnx(pruned_llama, out, overwrite=True)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_cli_replaces_only_with_force_and_a_mismatch_leaves_no_output(pruned_llama, tmp_path, capsys):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    assert cli(["--model", str(pruned_llama), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert cli(["--model", str(pruned_llama), "--out", str(out), "--force"]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"exported {pruned_llama} -> {out}/model.onnx (causal-lm, opset 18")
    assert line.count("\n") == 1
    assert (out / "model.onnx").is_file() and not (out / "stale.txt").exists()

    # an impossible tolerance: verification fails, the finished output is untouched, the attempt kept aside
    before = (out / "model.onnx").read_bytes()
    with pytest.raises(ExportMismatch, match="differs from torch"):
        export_onnx(pruned_llama, out, atol=1e-12, overwrite=True)
    assert (out / "model.onnx").read_bytes() == before
    assert (tmp_path / "onnx.partial" / "model.onnx").is_file()
    assert cli(["--model", str(pruned_llama), "--out", str(tmp_path / "other"), "--atol", "1e-12"]) == 1
    assert "differs from torch" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_per_tensor_external_data_is_gathered_into_one_file(pruned_llama, tmp_path):
    import onnx

    export_onnx(pruned_llama, tmp_path / "onnx")
    feeds = fresh_batch(AutoTokenizer.from_pretrained(pruned_llama))
    expected = run_onnx(tmp_path / "onnx", feeds)
    split = tmp_path / "split"
    split.mkdir()
    # the layout the TorchScript exporter writes past 2 GB: one file per weight beside the graph
    onnx.save_model(onnx.load(str(tmp_path / "onnx" / "model.onnx")), str(split / "model.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(split.iterdir())) > 5
    assert consolidate_external_data(split / "model.onnx") == ["model.onnx", "model.onnx.data"]
    np.testing.assert_array_equal(run_onnx(split, feeds), expected)
