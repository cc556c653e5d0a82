"""`prunefusion compress export-onnx`: a (pruned) Hugging Face checkpoint -> ONNX, verified against torch.

    prunefusion compress export-onnx --model DIR --out DIR [--opset 18] [--atol 1e-4] [--force]

OUT holds model.onnx (plus model.onnx.data for models over the 2 GB protobuf limit), the tokenizer, config.json,
generation_config.json where the source has one, and onnx_export.json (the summary below). The graph is one plain
full-sequence forward in float32: inputs `input_ids` and `attention_mask` (int64, [batch, sequence], both axes
dynamic); output `logits` [batch, sequence, vocab] for a causal LM, `last_hidden_state` [batch, sequence, hidden] for
a bare encoder (BERT/MiniLM; token_type_ids fixed at 0). There is no KV cache: each call recomputes the whole
sequence, fine for scoring and embedding, quadratic for token-by-token generation.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

from prunefusion.atomic import atomic_dir

ONNX_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
DEFAULT_OPSET = 18  # onnxruntime >= 1.14 and most other runtimes load it
MIN_OPSET, MAX_OPSET = 14, 20  # 14: first with scaled_dot_product_attention; 20: the TorchScript exporter's newest
INPUTS = ("input_ids", "attention_mask")
CONFIG_FILES = ("config.json", "generation_config.json")


class ExportMismatch(RuntimeError):
    """onnxruntime's outputs differ from torch's by more than the tolerance."""


def _wrap(model, output: str, causal: bool):
    import torch

    class Forward(torch.nn.Module):
        """(input_ids, attention_mask) -> one tensor: the positional signature the exporter traces."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            extra = {"use_cache": False} if causal else {}
            return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask, **extra), output)

    return Forward().eval()


def _max_positions(config) -> int:
    text = config.get_text_config()
    return int(getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 512)


def sample_inputs(vocab_size: int, batch: int, length: int, *, seed: int, pad: int = 0) -> dict:
    """Random ids; with `pad`, the first row is right-padded and the last row left-padded by `pad` tokens."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, length - pad:] = 0
        mask[-1, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def compare(session, forward, feeds: dict) -> float:
    """Max |onnxruntime - torch| over the positions the attention mask keeps (padding positions are undefined)."""
    import numpy as np
    import torch

    with torch.no_grad():
        expected = forward(**feeds).numpy()
    actual = session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    if actual.shape != expected.shape:
        raise ExportMismatch(f"onnxruntime output shape {actual.shape} != torch {expected.shape}")
    keep = feeds["attention_mask"].numpy().astype(bool)
    return float(np.abs(actual - expected)[keep].max())


def consolidate_external_data(onnx_path: Path) -> list[str]:
    """Past 2 GB the TorchScript exporter writes each weight to its own file beside the graph; gather them into one
    model.onnx.data (the layout onnxruntime, optimum and ORT GenAI expect). Returns the ONNX files left."""
    import onnx

    folder = onnx_path.parent
    strays = [p for p in folder.iterdir() if p.name != onnx_path.name]
    if strays:
        proto = onnx.load(str(onnx_path))  # reads the per-tensor files; needs the model's size in memory
        onnx.save_model(proto, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_NAME, size_threshold=1024)
        del proto
        for path in strays:
            if path.name != DATA_NAME:
                path.unlink()
    return sorted(p.name for p in folder.iterdir())


def _export(forward, example: dict, path: Path, output: str, opset: int) -> None:
    import torch

    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUTS, output)}
    # The TorchScript exporter (dynamo=False), not the torch.export-based default: with torch 2.13 / transformers
    # 5.19 both give matching graphs for all ten pico families and BERT, but this one needs no `onnxscript`
    # dependency and exports 10-20x faster (0.5 s vs 5-13 s for a pico model). It traces one example, so Python
    # branches on shapes are frozen: the example is padded, with batch and sequence > 1, to take the general
    # masked-attention path, and the verification in export_onnx runs other shapes. Its tracer and deprecation
    # warnings are silenced for that reason; a future torch that drops it fails here loudly, and dynamo=True
    # (plus `onnxscript`) with dynamic_shapes is the replacement.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        for message in (".*legacy TorchScript-based ONNX export", "The feature will be removed"):
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        torch.onnx.export(forward, (example["input_ids"], example["attention_mask"]), str(path), dynamo=False,
                          opset_version=opset, input_names=list(INPUTS), output_names=[output],
                          dynamic_axes=dynamic_axes, do_constant_folding=True)


def export_onnx(model_dir: Path, out_dir: Path, *, opset: int | None = None, atol: float = 1e-4,
                overwrite: bool = False) -> dict:
    """Export `model_dir` to `out_dir`/model.onnx, verify it with onnxruntime, return (and save) a summary.

    Verification runs onnxruntime (CPUExecutionProvider) on three inputs of other shapes than the traced example
    (one row; a batch with a right- and a left-padded row; one token) and raises ExportMismatch when the max
    absolute difference from torch, over non-padding positions, exceeds `atol`. The export is written to
    `out_dir`.partial and renamed at the end, so an interrupted or failed export never leaves a finished-looking
    `out_dir` (a failed verification keeps the .partial directory for inspection).
    """
    import onnx
    import onnxruntime as ort
    import torch

    from prunefusion.model_kinds import checkpoint_kind

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    opset = DEFAULT_OPSET if opset is None else opset
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset} is not supported: choose one in [{MIN_OPSET}, {MAX_OPSET}]")
    if atol <= 0:
        raise ValueError(f"atol must be positive, got {atol}")
    kind = checkpoint_kind(model_dir)
    if out_dir.resolve() in (model_dir.resolve(), *model_dir.resolve().parents):
        raise ValueError(f"--out {out_dir} would replace the model directory {model_dir} (or one holding it)")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --force to replace it")

    started = time.monotonic()
    model, tokenizer = kind.load(model_dir)
    model = model.float()  # onnxruntime's CPU kernels have no bfloat16 MatMul; float32 also keeps atol meaningful
    output = kind.output
    forward = _wrap(model, output, kind.causal)
    vocab = model.config.get_text_config().vocab_size
    longest = min(16, _max_positions(model.config))

    with atomic_dir(out_dir) as tmp:  # a failed verification leaves OUT.partial for inspection
        onnx_path = tmp / ONNX_NAME
        _export(forward, sample_inputs(vocab, 2, min(8, longest), seed=0, pad=min(3, longest - 1)), onnx_path, output,
                opset)
        onnx_files = consolidate_external_data(onnx_path)
        size = sum((tmp / name).stat().st_size for name in onnx_files)

        onnx.checker.check_model(str(onnx_path))  # by path: works past 2 GB
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        cases = [sample_inputs(vocab, 1, min(5, longest), seed=1),
                 sample_inputs(vocab, 3, longest, seed=2, pad=longest // 2),
                 sample_inputs(vocab, 1, 1, seed=3)]
        diffs = [compare(session, forward, feeds) for feeds in cases]
        worst = max(diffs, key=lambda d: (math.isnan(d), d))  # a NaN is the worst
        if not worst <= atol:
            raise ExportMismatch(f"onnxruntime differs from torch by {worst:.3g} > atol {atol:g} (per input: "
                                 f"{', '.join(f'{d:.3g}' for d in diffs)}); export left in {tmp}")

        tokenizer.save_pretrained(tmp)
        for name in CONFIG_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        summary = {"kind": "prunefusion.onnx", "source": str(model_dir), "path": str(out_dir / ONNX_NAME),
                   "files": onnx_files, "size_bytes": size, "opset": opset, "exporter": "torchscript",
                   "torch": torch.__version__, "task": kind.name,
                   "inputs": [i.name for i in session.get_inputs()], "outputs": [o.name for o in session.get_outputs()],
                   "atol": atol, "max_abs_difference": worst,
                   "verified_shapes": [list(c["input_ids"].shape) for c in cases],
                   "seconds": round(time.monotonic() - started, 2)}
        (tmp / "onnx_export.json").write_text(json.dumps(summary, indent=1) + "\n")
        del session
    return summary


def _export_command(args: argparse.Namespace) -> int:
    try:
        s = export_onnx(Path(args.model), Path(args.out), opset=args.opset, atol=args.atol, overwrite=args.force)
    except ExportMismatch as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"exported {args.model} -> {s['path']} ({s['task']}, opset {s['opset']}, {s['size_bytes'] / 1e6:.1f} MB, "
          f"inputs {', '.join(s['inputs'])} -> {', '.join(s['outputs'])}); onnxruntime vs torch max abs difference "
          f"{s['max_abs_difference']:.1e} <= {s['atol']:g} on {len(s['verified_shapes'])} inputs, {s['seconds']} s")
    return 0


def add_export_parser(sub) -> None:
    """The `export-onnx` subcommand on `compress`'s subparsers."""
    x = sub.add_parser("export-onnx", help="export a (pruned) checkpoint to ONNX, verified with onnxruntime",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("--model", required=True, help="a Hugging Face model directory (e.g. from `compress prune`)")
    x.add_argument("--out", required=True, help="directory for model.onnx, tokenizer and config")
    x.add_argument("--opset", type=int, default=None, help=f"ONNX opset, {MIN_OPSET}-{MAX_OPSET} "
                   f"(default {DEFAULT_OPSET})")
    x.add_argument("--atol", type=float, default=1e-4, help="max abs difference from torch allowed (default 1e-4)")
    x.add_argument("--force", action="store_true", help="replace --out")
    x.set_defaults(func=_export_command)
