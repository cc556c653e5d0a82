"""Choose a block and write the pruned model as a plain Hugging Face checkpoint that is verified on reload.

Shared by `compress prune` and the `compress run` job: the block comes from a strategy (a distance table when the
strategy needs one) or is given explicitly; the checkpoint is written under a temporary name and renamed at the end.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from prunefusion.atomic import atomic_dir
from prunefusion.compression.layers import prune_layers
from prunefusion.compression.measure import DistanceTable
from prunefusion.compression.records import PruneResult
from prunefusion.compression.strategies import STRATEGIES, block_size

PROBE_TEXT = "The quick brown fox jumps over the lazy dog"


@dataclass(frozen=True)
class Block:
    start: int
    end: int
    strategy: str
    distance: float | None  # d(x^start, x^end), last token, when a table was measured


def parse_layers(spec: str) -> tuple[int, int]:
    """'START:END' (0-based, half-open) -> (start, end)."""
    try:
        start, end = (int(x) for x in spec.split(":"))
    except ValueError as err:
        raise ValueError(f"--layers takes START:END (0-based, half-open), got {spec!r}") from err
    return start, end


def choose_block(num_layers: int, *, strategy: str = "angular", n: int | None = None, fraction: float | None = None,
                 layers: str | None = None, table: DistanceTable | None = None, seed: int = 0) -> Block:
    """The block to remove: explicit `layers`, or `n` / `fraction` layers chosen by `strategy`."""
    if layers:
        start, end = parse_layers(layers)
        strategy = "explicit"
    else:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
        size = block_size(num_layers, n, fraction)
        if STRATEGIES[strategy].needs_table:
            if table is None:
                raise ValueError(f"strategy {strategy!r} needs a distance table (compress measure)")
            if table.num_layers != num_layers:
                raise ValueError(f"distances are for {table.num_layers} layers, the model has {num_layers}")
        start = STRATEGIES[strategy].choose(table, size, num_layers, seed)
        end = start + size
    distances = table.all_tokens if strategy == "angular-all-tokens" else table.last_token if table else None
    distance = distances[end - start][start] if distances and end - start in distances else None
    return Block(start, end, strategy, distance)


def write_pruned(model, tokenizer, block: Block, out: Path, *, source: Path, source_digest: str,
                 allow_last: bool = False) -> PruneResult:
    """Prune `model` in place, save to `out` (atomically), verify the reload, write and return its manifest."""
    from prunefusion.checkpoints import weights_digest

    pruned, record = prune_layers(model, block.start, block.end, inplace=True, allow_last=allow_last)
    with atomic_dir(out) as tmp:
        pruned.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        verify_reload(pruned, tokenizer, tmp)
        manifest = PruneResult(source=str(source), source_weights_digest=source_digest, strategy=block.strategy,
                               **record, distance=block.distance,
                               num_parameters=sum(p.numel() for p in pruned.parameters()),
                               weights_digest=weights_digest(tmp))
        record = {k: v for k, v in asdict(manifest).items() if k != "seconds"}  # the stage's time: not the model's
        (tmp / "manifest.json").write_text(json.dumps(record, indent=1) + "\n")
    return manifest


@torch.no_grad()
def verify_reload(model, tokenizer, directory: Path) -> None:
    """The checkpoint reloads with no missing or unexpected keys and gives the in-memory model's outputs."""
    reloaded, info = type(model).from_pretrained(directory, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise RuntimeError(f"pruned checkpoint does not reload cleanly: {info}")
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"]
    expected, actual = model.eval()(input_ids=ids)[0], reloaded.eval()(input_ids=ids)[0]
    if not torch.allclose(expected, actual, atol=1e-5, rtol=1e-4):
        raise RuntimeError("pruned checkpoint's outputs differ from the in-memory pruned model")
