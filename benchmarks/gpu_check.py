"""GPU check of the torch engine (run on a CUDA host; nothing in CI depends on it).

    python benchmarks/gpu_check.py --model-dir DIR [--out results.json]

For each (model, dtype): sequential transformers `generate` (greedy, batch of one) vs the engine in-process at
concurrency 1, 4 and 16 on the same prompts; prints tokens/s ratios and whether the engine's tokens equal the
baseline's. Models: the given directory (e.g. the default tiny-lm) and a random-weight ~180M-parameter Llama built
from a config with the same tokenizer (where a GPU's batching matters). Runs from a checkout without installing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_engine():
    """Import the engine from a checkout: map the `server/` folder to `prunefusion.server` as setuptools does."""
    try:
        import prunefusion.server  # noqa: F401  (installed)
    except ImportError:
        import importlib.util

        sys.path.insert(0, str(ROOT))
        spec = importlib.util.spec_from_file_location("prunefusion.server", ROOT / "server" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "server")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["prunefusion.server"] = module
        spec.loader.exec_module(module)
    from prunefusion.server.engines import base, torch_engine

    return base, torch_engine


PROMPTS = ["The os module", "Lists are mutable sequences", "The with statement", "Raised when an operation",
           "Return a new dictionary", "The socket module provides", "A class that", "This function returns",
           "Open a file and return", "The json module", "Decorators are", "The asyncio event loop",
           "Create a new thread", "Exceptions raised by", "Return the number of", "The re module"]


def baseline(model_dir: Path, dtype, n_new: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda").eval()
    outs = []
    with torch.inference_mode():
        model.generate(tok("warm", return_tensors="pt").input_ids.cuda(), max_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids.cuda()
            outs.append(model.generate(ids, max_new_tokens=n_new, do_sample=False)[0, ids.shape[1]:].tolist())
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    return sum(map(len, outs)) / elapsed, outs


async def engine_run(base, torch_engine, model_dir: Path, dtype_name: str, n_new: int, concurrency: int):
    from prunefusion.server.config import TorchModelConfig

    engine = torch_engine.TorchEngine(TorchModelConfig(
        name="gpu", path=str(model_dir), device="cuda", dtype=dtype_name, max_batch_size=16))
    await engine.start()
    sem = asyncio.Semaphore(concurrency)

    async def one(i, p):
        async with sem:
            return await base.collect(engine.generate(base.GenerationRequest(
                f"r{i}", p, base.SamplingParams(max_new_tokens=n_new))))

    await base.collect(engine.generate(base.GenerationRequest("warm", "warm", base.SamplingParams(4))))
    start = time.perf_counter()
    results = await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))
    elapsed = time.perf_counter() - start
    await engine.shutdown()
    return sum(len(r.token_ids) for r in results) / elapsed, [list(r.token_ids) for r in results]


def build_medium(model_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         initializer_range=0.05)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    import torch
    import transformers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    base, torch_engine = import_engine()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {"tiny-lm": args.model_dir, "random-llama-180M": build_medium(args.model_dir, Path(tmp) / "m")}
        for name, path in models.items():
            for dtype_name in ("float32", "bfloat16"):
                base_tps, base_tokens = baseline(path, getattr(torch, dtype_name), args.max_new_tokens)
                print(f"{name} {dtype_name}: sequential generate {base_tps:8.1f} tok/s  1.00x")
                for c in (1, 4, 16):
                    tps, tokens = asyncio.run(engine_run(base, torch_engine, path, dtype_name, args.max_new_tokens, c))
                    same = sum(a == b for a, b in zip(tokens, base_tokens, strict=True))
                    print(f"{name} {dtype_name}: engine concurrency {c:2d}  {tps:8.1f} tok/s  {tps / base_tps:5.2f}x"
                          f"   outputs equal to generate: {same}/{len(PROMPTS)}")
                    results.append(dict(model=name, dtype=dtype_name, concurrency=c, tokens_per_s=tps,
                                        baseline_tokens_per_s=base_tps, ratio=tps / base_tps, equal_outputs=same))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
