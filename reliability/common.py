"""What the scenarios share: a random-weight pico LM to serve, a server config written for it, a served process,
its memory and open files. Loopback only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from prunefusion.loadtest.server_process import ServerProcess

PICO_CONTEXT = 256


def build_pico_lm(out_dir: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A servable random-weight Llama (weights, tokenizer, generation config) in about a second; built once per
    directory. Correctness and fault figures need a model that runs, not one that writes well."""
    if (out_dir / "config.json").is_file():
        return out_dir
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from prunefusion.models.corpus import pydoc_topics
    from prunefusion.models.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(pydoc_topics()[:30], vocab_size=384, max_length=PICO_CONTEXT)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=PICO_CONTEXT, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(out_dir)
    return out_dir


def write_config(path: Path, model_dir: Path, *, server: dict[str, Any] | None = None,
                 cache: dict[str, Any] | None = None, quality: dict[str, Any] | None = None,
                 model: dict[str, Any] | None = None) -> Path:
    """A server config serving the pico LM as `pico` (port chosen by ServerProcess), metrics on a free port, the
    cache embedded under the config's directory unless `cache` says otherwise; the dicts override sections."""
    config = {
        "server": {"host": "127.0.0.1", "metrics_port": 0, "http_port": None, "drain_seconds": 10, **(server or {})},
        "cache": {"data_dir": str(path.parent / "redis"), **(cache or {})},
        "quality": {"workers": 1, **(quality or {})},
        "models": [{"name": "pico", "path": str(model_dir), "max_new_tokens_limit": 64, **(model or {})}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def serve(config: Path, log: Path, *, startup_timeout_s: float = 120.0) -> ServerProcess:
    """`prunefusion serve --config` in its own process, SERVING when this returns (its log in `log`)."""
    return ServerProcess(config, startup_timeout_s=startup_timeout_s, log=log)


def status_kb(pid: int, key: str) -> int:
    """A kB field of /proc/PID/status (VmRSS, VmHWM, ...); OSError once the process is gone."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise ValueError(f"no {key} for pid {pid}")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process now (Linux /proc)."""
    return status_kb(pid, "VmRSS") * 1024


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
