"""Find and replace the stack of transformer blocks of any supported Hugging Face model, through one table."""

from __future__ import annotations

import copy
import logging

import torch

log = logging.getLogger(__name__)

# attribute path of the block list, first match wins: Llama/Mistral/Qwen2/Qwen3/Gemma/Phi-3, multimodal wrappers,
# GPT-2, GPT-NeoX, OPT, BERT-style encoders (MiniLM) as bare model or under a task head
LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
               "model.decoder.layers", "encoder.layer", "bert.encoder.layer", "layers")


def _resolve(model: torch.nn.Module, path: str):
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    for path in LAYER_PATHS:
        layers = _resolve(model, path)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return path, layers
    raise ValueError(f"{type(model).__name__}: no transformer block list found at any of {LAYER_PATHS}")


def prune_layers(model: torch.nn.Module, start: int, end: int, *, inplace: bool = False,
                 allow_last: bool = False) -> tuple[torch.nn.Module, dict]:
    """Remove blocks [start, end) (0-based, half-open). Returns the pruned model and a record of what changed.

    Renumbers every `layer_idx` (transformers' KV cache is indexed by it), sets `num_hidden_layers` on the text
    config and subsets every per-layer list of the config (`layer_types`, ...) by the kept indices, so Gemma-style
    sliding/full patterns stay attached to the right layers. Works on a deep copy unless `inplace`.
    """
    path, layers = find_layers(model)
    total = len(layers)
    if not 0 <= start < end <= total:
        raise ValueError(f"layers [{start}, {end}) is not a non-empty block within [0, {total})")
    if end == total and not allow_last:
        raise ValueError(f"[{start}, {end}) would drop the final layer; it is nearly maximally dissimilar (pass "
                         "allow_last=True / --allow-last to do it anyway)")
    if end - start == total:
        raise ValueError("cannot remove every layer")
    if not inplace:
        model = copy.deepcopy(model)  # the config is copied with it, so the original model keeps its own
        path, layers = find_layers(model)
    kept = [i for i in range(total) if not start <= i < end]
    parent_path, _, attr = path.rpartition(".")
    parent = _resolve(model, parent_path) if parent_path else model
    setattr(parent, attr, torch.nn.ModuleList([layers[i] for i in kept]))
    for new_index, layer in enumerate(getattr(parent, attr)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    text_config = model.config.get_text_config()
    subset = []
    for name, value in list(vars(text_config).items()):
        if isinstance(value, list | tuple) and len(value) == total and not name.startswith("_"):
            setattr(text_config, name, type(value)(value[i] for i in kept))
            subset.append(name)
    text_config.num_hidden_layers = len(kept)
    record = {"layers_path": path, "original_num_layers": total, "removed": [start, end], "kept": kept,
              "config_lists_subset": subset}
    log.info("pruned %s [%d, %d): %d -> %d layers; per-layer config lists subset: %s", path, start, end, total,
             len(kept), subset or "none")
    return model, record
