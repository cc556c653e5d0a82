"""QLoRA healing of a pruned pico model: it lowers the loss, merges to a plain checkpoint, resumes after a kill."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunefusion.compression.heal import HealConfig, heal
from prunefusion.compression.layers import prune_layers
from prunefusion.models.build import pack_documents, perplexity, windows
from prunefusion.models.corpus import pydoc_topics

CFG = HealConfig(steps=60, batch_size=8, seq_len=64, learning_rate=3e-2, warmup_steps=3, rank=8,
                 checkpoint_every=10)


@pytest.fixture(scope="module")
def texts():
    return pydoc_topics()[:40]


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, texts):
    from pico import build_pico_llama

    source = build_pico_llama(tmp_path_factory.mktemp("heal") / "src", layers=4)
    model = AutoModelForCausalLM.from_pretrained(source)
    pruned, _ = prune_layers(model, 1, 3, inplace=True)
    out = source.parent / "pruned"
    pruned.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def held_loss(model_dir, texts) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = windows(pack_documents(tokenizer, texts), 64)[:32]
    return math.log(perplexity(AutoModelForCausalLM.from_pretrained(model_dir).eval(), rows))


@pytest.fixture(scope="module")
def healed(tmp_path_factory, pruned_dir, texts):
    out = tmp_path_factory.mktemp("healed")
    return out, heal(pruned_dir, out, texts, CFG)


def test_healing_lowers_the_loss(healed, pruned_dir, texts):
    out, summary = healed
    assert summary["steps_run"] == 60 and summary["step"] == 60
    assert held_loss(out / "merged", texts) < held_loss(pruned_dir, texts) - 0.5
    assert (out / "heal_loss.png").stat().st_size > 10_000


def test_merged_checkpoint_is_plain_and_equals_the_adapter(healed, pruned_dir):
    from peft import PeftModel

    out, summary = healed
    weights = {}
    for f in (out / "merged").glob("*.safetensors"):
        weights.update(load_file(f))
    assert not [k for k in weights if "lora" in k or "absmax" in k or "quant" in k]
    assert {t.dtype for t in weights.values()} == {torch.float32}
    base = AutoModelForCausalLM.from_pretrained(pruned_dir)
    with_adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-4, rtol=1e-4)
        unhealed = AutoModelForCausalLM.from_pretrained(pruned_dir).eval()  # `base` now carries the adapter
        assert not torch.allclose(merged(ids).logits, unhealed(ids).logits, atol=1e-3)  # healing changed it
    assert summary["merge"]["max_logit_difference"] < 1e-3


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path, pruned_dir, texts, healed):
    first = heal(pruned_dir, tmp_path, texts, CFG, stop_after_steps=12)  # killed after step 12; checkpoint at 10
    assert first["steps_run"] == 12 and "merge" not in first and not (tmp_path / "merged").exists()
    second = heal(pruned_dir, tmp_path, texts, CFG)
    assert second["resumed_from"] == 10 and second["steps_run"] == 50
    # the same adapter as the uninterrupted run: optimizer, schedule, data order and dropout RNG were restored
    done = load_file(healed[0] / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert done.keys() == resumed.keys()
    for key in done:
        torch.testing.assert_close(resumed[key], done[key])


def test_a_resume_state_that_runs_code_when_unpickled_is_refused(tmp_path, pruned_dir, texts):
    from test_transfusion_build import Payload

    marker = tmp_path / "ran"
    step = tmp_path / "checkpoints" / "step-10"
    step.mkdir(parents=True)
    torch.save({"step": 10, "losses": Payload(marker)}, step / "state.pt")
    with pytest.raises(ValueError, match="refusing to load it"):
        heal(pruned_dir, tmp_path, texts, CFG)
    assert not marker.exists()
