"""engine: onnx — sentence embeddings with onnxruntime on a `prunefusion compress export-onnx` directory.

The graph and its run are quality/embeddings.py's `OnnxEmbedder` (the same code that scores corpora): float32
`last_hidden_state` from `input_ids` + `attention_mask`, mean-pooled over the mask and L2-normalised. `device: cuda`
asks for onnxruntime-gpu's CUDA execution provider (refused at start when it is not installed), `cpu` for the CPU
one. Batching, tokenizing and the request checks are the shared batcher's (embedding_batcher.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from prunefusion.server.config import OnnxEmbeddingConfig
from prunefusion.server.engines.embedding_batcher import BatchedEmbeddingEngine, LoadedModel

# device type -> onnxruntime execution providers, in order of preference
PROVIDERS = {"cpu": ("CPUExecutionProvider",), "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider")}


def onnx_parameters(onnx_path: Path) -> int:
    """Elements in the graph's initializers (its weights), read without loading external weight data."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in graph.initializer))


class OnnxEmbeddingEngine(BatchedEmbeddingEngine):
    engine_name = "onnx"

    def __init__(self, cfg: OnnxEmbeddingConfig) -> None:
        super().__init__(cfg)
        self._embedder = None

    def _load(self, model_dir: Path) -> LoadedModel:
        import onnxruntime as ort

        from prunefusion.checkpoints import digest_files
        from prunefusion.compression.onnx_export import DATA_NAME, ONNX_NAME
        from prunefusion.quality.embeddings import OnnxEmbedder

        device = self.cfg.device.split(":")[0]
        if device not in PROVIDERS:
            raise ValueError(f"model {self.name!r}: device {self.cfg.device!r}; the onnx engine runs on "
                             f"{list(PROVIDERS)}")
        wanted = PROVIDERS[device]
        if wanted[0] not in ort.get_available_providers():
            raise RuntimeError(f"model {self.name!r}: device {device} needs onnxruntime's {wanted[0]} "
                               f"(pip install onnxruntime-gpu); available: {ort.get_available_providers()}")
        onnx_path = model_dir / ONNX_NAME
        if not onnx_path.is_file():
            raise FileNotFoundError(f"model {self.name!r}: {onnx_path} is missing; make it with "
                                    f"`prunefusion compress export-onnx --model CHECKPOINT --out {model_dir}`")
        # its own tokenizer goes unused: the batcher tokenizes (and checks lengths) for both engines
        self._embedder = OnnxEmbedder(onnx_path, model_dir, threads=self.cfg.threads, providers=wanted)
        hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
        weights = [p for p in (onnx_path, model_dir / DATA_NAME) if p.is_file()]
        return LoadedModel(int(hidden), onnx_parameters(onnx_path), digest_files(weights))

    def _encode(self, ids: list[list[int]]) -> np.ndarray:
        return self._embedder.embed_ids(ids)
