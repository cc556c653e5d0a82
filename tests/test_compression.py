"""Layer-similarity measurement and pruning: fast paths against slow references, checkpoints that reload."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from pico import FAMILIES, pico_family_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunefusion.compression.angular import best_block
from prunefusion.compression.layers import find_layers, prune_layers
from prunefusion.compression.measure import measure, tokenized_batches

TEXTS = ["The os module provides a portable way of using operating system dependent functionality.",
         "Lists are mutable sequences.", "x", "Raised when an operation or function is applied to an object",
         "The with statement is used to wrap the execution of a block with methods defined by a context manager."]


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The slow, obvious reference: (1/pi) arccos(cos(a, b)) per pair; [..., D] x [..., D] -> [...], float64."""
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


@pytest.fixture(scope="module")
def tokenizer(pico_dir):
    return AutoTokenizer.from_pretrained(pico_dir)


def llama(tokenizer, layers=6, seed=0):
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def reference_table(model, batches):
    """Slow and obvious: output_hidden_states-free, one (l, n) pair and one sample at a time, from hooks."""
    _, layers = find_layers(model)
    total = len(layers)
    sums: dict[tuple[int, int], float] = {}
    count = 0
    inputs: list = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: inputs.append(a[0] if a else k["hidden_states"]),
                                             with_kwargs=True) for layer in layers]
    hooks.append(layers[-1].register_forward_hook(lambda m, a, o: inputs.append(o[0] if isinstance(o, tuple)
                                                                                else o)))
    for batch in batches:
        inputs.clear()
        with torch.no_grad():
            model(**batch)
        for b in range(batch["input_ids"].shape[0]):
            t = int(batch["attention_mask"][b].sum()) - 1  # right padding
            for n in range(1, total + 1):
                for first in range(total - n + 1):
                    d = float(angular_distance(inputs[first][b, t], inputs[first + n][b, t]))
                    sums[(first, n)] = sums.get((first, n), 0.0) + d
            count += 1
    for h in hooks:
        h.remove()
    return {n: [sums[(first, n)] / count for first in range(total - n + 1)] for n in range(1, total + 1)}


def test_one_pass_table_equals_per_pair_reference(tokenizer):
    model = llama(tokenizer)
    batches = tokenized_batches(tokenizer, TEXTS, seq_len=32, batch_size=2)
    table = measure(model, batches)
    reference = reference_table(model, batches)
    assert table.samples == len(TEXTS) and table.num_layers == 6
    assert set(table.last_token) == set(reference) == set(range(1, 7))
    for n in reference:
        assert table.last_token[n] == pytest.approx(reference[n], abs=1e-6)
    assert len(table.block_influence) == 6 and all(0 <= b <= 2 for b in table.block_influence)


def test_angular_strategy_finds_a_planted_near_identity_block(tokenizer):
    model = llama(tokenizer, layers=8, seed=1)
    _, layers = find_layers(model)
    with torch.no_grad():
        for i in (4, 5):  # blocks 4 and 5 barely change the residual stream
            for name, p in layers[i].named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    p.mul_(1e-4)
    table = measure(model, tokenized_batches(tokenizer, TEXTS, 32, 5))
    assert best_block(table.last_token, 2) == (4, pytest.approx(table.last_token[2][4]))
    assert table.last_token[2][4] < 0.01 < min(d for start, d in enumerate(table.last_token[2]) if start != 4)
    # the final layer is never part of a chosen block unless forced
    assert all(start + n < 8 for n in range(1, 8) for start, _ in [best_block(table.last_token, n)])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prune_save_reload_equals_in_memory(family, tokenizer, tmp_path):
    original = pico_family_model(family, tokenizer, layers=4)
    config = original.config
    types_before = list(getattr(original.config.get_text_config(), "layer_types", None) or [])
    pruned, record = prune_layers(original, 1, 3)
    assert record["kept"] == [0, 3]
    assert original.config.get_text_config().num_hidden_layers == 4  # the original is untouched
    assert len(find_layers(original)[1]) == 4
    text_config = pruned.config.get_text_config()
    assert text_config.num_hidden_layers == 2
    if types_before:
        assert list(text_config.layer_types) == [types_before[0], types_before[3]]
    pruned.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = tokenizer("The os module provides", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, pruned(ids).logits)
        # generation with a KV cache works: layer_idx was renumbered
        out = reloaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 5
    if config.tie_word_embeddings:
        assert reloaded.get_output_embeddings().weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()


def test_minilm_encoder_prunes_and_reloads(tmp_path):
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                                     intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    pruned, record = prune_layers(model, 2, 4)
    assert record["layers_path"] == "encoder.layer" and len(pruned.encoder.layer) == 4
    pruned.save_pretrained(tmp_path)
    reloaded, info = transformers.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).last_hidden_state, pruned(ids).last_hidden_state)


def test_final_layer_is_protected(tokenizer):
    model = llama(tokenizer, layers=4)
    with pytest.raises(ValueError, match="final layer"):
        prune_layers(model, 2, 4)
    pruned, _ = prune_layers(model, 2, 4, allow_last=True)
    assert len(find_layers(pruned)[1]) == 2
    with pytest.raises(ValueError, match="block"):
        prune_layers(model, 3, 3)


def run_cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "prunefusion.cli", "compress", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_measure_and_prune_commands_write_servable_checkpoints(tmp_path):
    import json

    from pico import build_pico_llama

    from prunefusion.server.engines.hf_loading import load_causal_lm

    source = build_pico_llama(tmp_path / "six", layers=6)
    calibration = tmp_path / "calib.jsonl"
    calibration.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    done = run_cli("measure", "--model", str(source), "--out", str(tmp_path / "m"), "--data", str(calibration))
    assert done.returncode == 0, done.stderr
    for name in ("distances.json", "distances.csv", "distance_heatmap.png", "best_blocks.png"):
        assert (tmp_path / "m" / name).stat().st_size > 0
    distances = json.loads((tmp_path / "m" / "distances.json").read_text())
    expected_start = distances["best_last_token"]["2"]["start"]

    outputs = {"angular": ["--n", "2", "--distances", str(tmp_path / "m" / "distances.json")],
               "simple": ["--fraction", "0.34", "--strategy", "simple"],
               "explicit": ["--layers", "1:3"]}
    for name, extra in outputs.items():
        done = run_cli("prune", "--model", str(source), "--out", str(tmp_path / name), *extra)
        assert done.returncode == 0, done.stderr
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert len(manifest["kept"]) == 4 and manifest["original_num_layers"] == 6
        loaded = load_causal_lm(tmp_path / name)
        assert loaded.num_layers == 4
        assert loaded.weights_digest == manifest["weights_digest"] != manifest["source_weights_digest"]
    assert json.loads((tmp_path / "angular" / "manifest.json").read_text())["removed"] == [expected_start,
                                                                                         expected_start + 2]
    assert json.loads((tmp_path / "simple" / "manifest.json").read_text())["removed"] == [3, 5]  # [L-n-1, L-1)
    assert not list(tmp_path.glob("*.partial"))
    refused = run_cli("prune", "--model", str(source), "--out", str(tmp_path / "x"), "--layers", "4:6")
    assert refused.returncode == 2 and "error: [4, 6) would drop the final layer" in refused.stderr
    forced = run_cli("prune", "--model", str(source), "--out", str(tmp_path / "x"), "--layers", "4:6", "--force")
    assert forced.returncode == 2 and "would drop the final layer" in forced.stderr  # --force only replaces --out
    allowed = run_cli("prune", "--model", str(source), "--out", str(tmp_path / "x"), "--layers", "4:6",
                      "--allow-last")
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads((tmp_path / "x" / "manifest.json").read_text())["removed"] == [4, 6]


def test_pack_documents_ignores_padding_left_on_the_tokenizer(tokenizer):
    from prunefusion.models.build import pack_documents

    clean = pack_documents(tokenizer, TEXTS)
    tokenizer(TEXTS, truncation=True, max_length=4, padding=True)  # leaves truncation/padding on the backend
    assert torch.equal(pack_documents(tokenizer, TEXTS), clean)


def test_choice_logprob_equals_the_masked_loss_reference(tokenizer):
    from prunefusion.compression.evaluate import choice_logprob, mc_accuracy

    model = llama(tokenizer, layers=2)
    context, choice = "The os module", " provides functions"
    context_len = len(tokenizer(context)["input_ids"])
    ids = torch.tensor([tokenizer(context + choice)["input_ids"]])
    labels = ids.clone()
    labels[0, :context_len] = -100  # only the choice's tokens count
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
    n_choice = ids.shape[1] - context_len
    assert choice_logprob(model, tokenizer, context, choice) == pytest.approx(-float(loss) * n_choice, rel=1e-4)
    # a task whose answer is whatever choice the model itself scores highest is solved; the opposite is not
    choices = [" provides functions", " lists", " the end"]
    scores = [choice_logprob(model, tokenizer, context, c) for c in choices]
    best = max(range(3), key=scores.__getitem__)
    assert mc_accuracy(model, tokenizer, [{"context": context, "choices": choices, "answer": best}]) == 1.0
    assert mc_accuracy(model, tokenizer, [{"context": context, "choices": choices, "answer": (best + 1) % 3}]) == 0.0


def test_a_checkpoint_without_a_tokenizer_is_one_clear_error(pico_dir, tmp_path, capsys):
    import shutil

    from prunefusion.checkpoints import TOKENIZER_FILES
    from prunefusion.cli import main
    from prunefusion.server.engines.hf_loading import describe_checkpoint

    bare = tmp_path / "bare"
    shutil.copytree(pico_dir, bare)
    for name in TOKENIZER_FILES:
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=f"no tokenizer in {bare}"):
        describe_checkpoint(bare)
    assert main(["compress", "prune", "--model", str(bare), "--out", str(tmp_path / "out"), "--layers", "0:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no tokenizer in {bare}") and err.count("\n") == 1
