"""The vLLM engine: argument mapping (everywhere), and where vLLM is installed, pruned checkpoints served through it
give transformers' greedy tokens, and a host that serves only torch models never imports vLLM."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from pico import pico_family_model, save_pico
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunefusion.server.config import ConfigError, VllmModelConfig, parse_config
from prunefusion.server.engines.base import (
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
    collect,
)
from prunefusion.server.engines.vllm_engine import (
    DEFAULT_CPU_KV_CACHE_BYTES,
    engine_arguments,
    sampling_arguments,
)


def vllm_model(path: str, device: str = "cpu", **vllm) -> VllmModelConfig:
    return VllmModelConfig(name="m", path=path, engine="vllm", device=device, vllm=vllm)


PROMPTS = ["The os module", "x", "Raised when", "The with statement is used to wrap the execution of a block"]


def test_engine_arguments_map_the_model_config():
    options = VllmModelConfig(name="m", path="/m", engine="vllm", dtype="bfloat16", max_batch_size=12,
                              vllm={"enforce_eager": True, "seed": 3, "engine_args": {"block_size": 32}})
    args = engine_arguments(options, context_length=512, environ={})
    assert args == {"model": "/m", "tokenizer": "/m", "dtype": "bfloat16", "max_model_len": 512, "max_num_seqs": 12,
                    "seed": 3, "trust_remote_code": False, "tensor_parallel_size": 1, "enforce_eager": True,
                    "disable_log_stats": True, "load_format": "safetensors",
                    "kv_cache_memory_bytes": DEFAULT_CPU_KV_CACHE_BYTES, "block_size": 32}


def test_cpu_kv_cache_default_yields_to_the_environment_and_gpu_leaves_it_to_vllm():
    assert "kv_cache_memory_bytes" not in engine_arguments(vllm_model("/m"), 256,
                                                           environ={"VLLM_CPU_KVCACHE_SPACE": "4"})
    gpu = engine_arguments(vllm_model("/m", device="cuda", gpu_memory_utilization=0.8, tensor_parallel_size=2), 256,
                           environ={})
    assert "kv_cache_memory_bytes" not in gpu
    assert gpu["gpu_memory_utilization"] == 0.8 and gpu["tensor_parallel_size"] == 2


def test_sampling_arguments():
    params = SamplingParams(max_new_tokens=7, temperature=0.7, top_p=0.9, top_k=0, seed=11, stop=("\n",),
                            presence_penalty=0.5, frequency_penalty=-0.25, repetition_penalty=1.2, min_new_tokens=3,
                            ignore_eos=True)
    assert sampling_arguments(params) == {  # stop sequences: applied by the adapter's detokenizer
        "max_tokens": 7, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "seed": 11, "presence_penalty": 0.5,
        "frequency_penalty": -0.25, "repetition_penalty": 1.2, "min_tokens": 3, "ignore_eos": True,
        "detokenize": False}
    with pytest.raises(InvalidRequestError, match="logprobs"):
        sampling_arguments(SamplingParams(max_new_tokens=7, logprobs=2))


def test_config_accepts_vllm_options_and_refuses_tensor_parallel_on_cpu():
    model = {"name": "m", "path": "/m", "engine": "vllm", "vllm": {"kv_cache_memory_bytes": 1 << 28}}
    assert parse_config({"models": [model]}).models[0].vllm.kv_cache_memory_bytes == 1 << 28
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        parse_config({"models": [{**model, "vllm": {"tensor_parallel_size": 2}}]})
    with pytest.raises(ConfigError, match="no_such_option"):
        parse_config({"models": [{**model, "vllm": {"no_such_option": 1}}]})
    with pytest.raises(ConfigError, match="max_model_len"):  # set from the model's context_length, not here
        parse_config({"models": [{**model, "vllm": {"engine_args": {"max_model_len": 64}}}]})


@pytest.mark.vllm
async def test_a_device_the_installed_vllm_does_not_run_on_is_refused_at_start(pico_vllm_dir):
    from vllm.platforms import current_platform

    from prunefusion.server.engines.vllm_engine import VllmEngine

    other = "cuda" if current_platform.device_type == "cpu" else "cpu"
    with pytest.raises(ValueError, match=f"asks for device '{other}'"):
        await VllmEngine(vllm_model(str(pico_vllm_dir), device=other)).start()


@pytest.mark.vllm
def test_a_torch_only_server_never_imports_vllm(pico_dir, tmp_path):
    config = tmp_path / "torch.yaml"
    config.write_text(f"cache: {{enabled: false}}\nquality: {{enabled: false}}\n"
                      f"models:\n  - name: pico\n    path: {pico_dir}\n")
    code = ("import asyncio, sys\n"
            "from prunefusion.server.app import PrunefusionServer\n"
            "from prunefusion.server.config import load_config\n"
            f"server = PrunefusionServer(load_config({str(config)!r}))\n"
            "async def main():\n"
            "    from prunefusion.server.cache.service import ResponseCache\n"
            "    for model in server.config.models:\n"
            "        await server.registry.load(model, ResponseCache(None))\n"
            "    await server.registry.shutdown()\n"
            "asyncio.run(main())\n"
            "assert 'vllm' not in sys.modules, 'vllm was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def hf_greedy(path, prompt: str, max_new_tokens: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()


def pruned_checkpoint(family: str, tokenizer, tmp_path, **overrides):
    """A 6-layer pico model of `family` pruned to 4 layers by the compression stage's own command."""
    source = save_pico(pico_family_model(family, tokenizer, layers=6, **overrides), tokenizer, tmp_path / family)
    out = tmp_path / f"{family}-pruned"
    done = subprocess.run([sys.executable, "-m", "prunefusion.cli", "compress", "prune", "--model", str(source),
                           "--out", str(out), "--layers", "2:4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


# vLLM's CPU attention needs head_dim >= 32; Qwen3 configs carry layer_types, which pruning must cut to length
VLLM_FAMILIES = {
    "llama": dict(hidden_size=128, intermediate_size=256),
    "qwen3": dict(hidden_size=128, intermediate_size=256, head_dim=32, layer_types=["full_attention"] * 6),
}


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(VLLM_FAMILIES))
async def test_pruned_checkpoints_give_transformers_greedy_tokens_in_vllm(family, pico_dir, tmp_path):
    from conftest import VLLM_TEST_OPTIONS

    from prunefusion.server.engines.vllm_engine import VllmEngine

    tokenizer = AutoTokenizer.from_pretrained(pico_dir)
    path = pruned_checkpoint(family, tokenizer, tmp_path, **VLLM_FAMILIES[family])
    engine = VllmEngine(VllmModelConfig(name=family, path=str(path), engine="vllm", vllm=VLLM_TEST_OPTIONS))
    await engine.start()
    try:
        assert engine.info.num_layers == 4
        for i, prompt in enumerate(PROMPTS):
            result = await collect(engine.generate(GenerationRequest(f"r{i}", prompt,
                                                                     SamplingParams(max_new_tokens=32))))
            assert list(result.token_ids) == hf_greedy(path, prompt, 32), prompt
            assert result.finish_reason in (FinishReason.EOS, FinishReason.LENGTH)
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("name", ["vllm-cpu.yaml", "vllm-gpu.yaml"])
def test_the_example_vllm_configs_are_valid(name):
    from pathlib import Path

    from prunefusion.server.config import load_config

    config = load_config(Path(__file__).parents[1] / "deploy" / "configs" / name)
    assert {m.engine for m in config.models} == {"vllm"}
