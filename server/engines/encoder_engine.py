"""engine: torch-encoder — sentence embeddings from a Hugging Face encoder checkpoint on plain PyTorch.

The reference the ONNX engine is checked against (tests/test_embeddings_server.py): transformers' AutoModel (the
model kinds' `encoder` loader), `last_hidden_state` mean-pooled over the attention mask and L2-normalised, the
same pooling sentence-transformers' Pooling(mean) + Normalize modules compute for all-MiniLM-L6-v2. Batching,
tokenizing and the request checks are the shared batcher's (embedding_batcher.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prunefusion.server.config import EncoderEmbeddingConfig
from prunefusion.server.engines.embedding_batcher import BatchedEmbeddingEngine, LoadedModel


class EncoderEmbeddingEngine(BatchedEmbeddingEngine):
    engine_name = "torch-encoder"

    def __init__(self, cfg: EncoderEmbeddingConfig) -> None:
        super().__init__(cfg)
        self._model = None

    def _load(self, model_dir: Path) -> LoadedModel:
        import torch

        from prunefusion.checkpoints import weights_digest
        from prunefusion.model_kinds import ENCODER, checkpoint_kind

        if checkpoint_kind(model_dir) is not ENCODER:
            raise ValueError(f"model {self.name!r}: {model_dir} holds a causal LM, not an encoder")
        model = ENCODER.auto_model().from_pretrained(model_dir, use_safetensors=True, local_files_only=True,
                                                     dtype=getattr(torch, self.cfg.dtype))
        self._model = model.to(self.cfg.device).eval()
        return LoadedModel(model.config.hidden_size, sum(p.numel() for p in model.parameters()),
                           weights_digest(model_dir))

    def _encode(self, ids: list[list[int]]) -> np.ndarray:
        import torch

        from prunefusion.quality.embeddings import mean_pool_normalize, pad_batch

        input_ids, mask = pad_batch(ids, self._pad_id)
        with torch.inference_mode():
            hidden = self._model(input_ids=torch.from_numpy(input_ids).to(self.cfg.device),
                                 attention_mask=torch.from_numpy(mask).to(self.cfg.device)).last_hidden_state
        return mean_pool_normalize(hidden.float().cpu().numpy(), mask)
