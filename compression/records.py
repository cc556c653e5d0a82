"""What a compression job's stages produce and what its manifest says, as typed records.

Each stage returns one of these; the job writes it to stages/<stage>.json (a rerun reads it back instead of running
the stage again), and the manifest is built from them. JSON is the records' `asdict`, so the files read as before.
Evaluation rows stay plain mappings: their columns differ by model kind (perplexity and decode speed for causal LMs,
mean cosine and sentences/s for encoders) and they go straight into tables.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

Record = TypeVar("Record")


def from_json(cls: type[Record], data: dict) -> Record:
    """A record from its JSON form; fields typed as records (or records | None) are rebuilt too."""
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        record = _record_type(hints[name])
        values[name] = from_json(record, value) if record is not None and isinstance(value, dict) else value
    return cls(**values)


def _record_type(hint) -> type | None:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return next((t for t in options if dataclasses.is_dataclass(t)), None)


@dataclass(frozen=True)
class MeasureResult:
    samples: int
    num_layers: int
    distances: str  # the distance table, relative to the job directory
    seconds: float = 0.0


@dataclass(frozen=True)
class PruneResult:
    """Also the manifest.json of a pruned checkpoint (`compress prune`)."""

    source: str
    source_weights_digest: str
    strategy: str
    layers_path: str
    original_num_layers: int
    removed: list[int]  # [start, end), 0-based, half-open
    kept: list[int]
    config_lists_subset: list[str]
    distance: float | None  # d(x^start, x^end), last token, when measured
    num_parameters: int
    weights_digest: str
    kind: str = "prunefusion.pruned"
    seconds: float = 0.0


@dataclass(frozen=True)
class HealResult:
    steps_run: int
    step: int
    resumed_from: int | None
    merge: dict[str, Any]  # the merge check: max difference of the kind's output, and the dtype merged in
    method: str  # "qlora" | "lora" | "full" (every weight trained: `merge` has no check)
    distilled: bool
    config: dict[str, Any]
    first_loss: float
    final_loss: float  # mean of the last 10 steps
    loss_curve: str
    seconds: float = 0.0


@dataclass(frozen=True)
class FilteredSet:
    """What the filter did to one set of texts (one set of the `filter` stage)."""

    documents: int
    kept: int
    reason_counts: dict[str, int]  # reason -> documents; a document may have several
    mean_score_kept: float | None
    mean_score_all: float | None
    config: dict
    config_digest: str
    kept_digest: str  # sha256 of the kept texts, in order
    file: str  # the kept texts (JSONL, {"text"}), relative to the job directory
    histogram: str  # score histogram, kept vs rejected


@dataclass(frozen=True)
class FilterResult:
    """The `filter` stage: the quality filter over the calibration and / or the healing text (data_filter.py)."""

    calibration: FilteredSet | None = None
    heal: FilteredSet | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class EvaluateResult:
    rows: list[dict[str, Any]]  # one per model, each with a "label": original, pruned, healed
    seconds: float = 0.0
    sets: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)  # evaluate.sets: name -> rows

    def by_label(self) -> dict[str, dict[str, Any]]:
        return {row["label"]: row for row in self.rows}


STAGE_RESULTS: dict[str, type] = {"filter": FilterResult, "measure": MeasureResult, "prune": PruneResult,
                                  "heal": HealResult, "evaluate": EvaluateResult}


@dataclass(frozen=True)
class Source:
    path: str
    weights_digest: str
    num_layers: int


@dataclass(frozen=True)
class Distances:
    file: str
    samples: int
    best_last_token: list[dict[str, Any]]  # {"n", "start", "distance"} per block size


@dataclass(frozen=True)
class Metrics:
    held_out_perplexity: float | None
    mean_cosine: float | None
    evaluation: list[dict[str, Any]]
    healing_gap_recovered: float | None = None  # (pruned - healed) / (pruned - original) perplexity
    sets: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)  # evaluate.sets: name -> rows


@dataclass(frozen=True)
class JobManifest:
    """manifest.json of a finished job: how the checkpoint beside it was made."""

    name: str
    job: dict[str, Any]
    job_sha256: str
    source: Source
    strategy: str
    removed: list[int]
    kept: list[int]
    distance: float | None
    distances: Distances
    healing: HealResult | None
    metrics: Metrics
    num_parameters: int
    weights_digest: str
    stage_seconds: dict[str, float]
    device: str
    versions: dict[str, str | None]
    finished_at: str
    kind: str = "prunefusion.compressed"
    data_filter: FilterResult | None = None  # what the quality filter kept of the calibration / healing text

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        from prunefusion.atomic import write_text_atomic

        write_text_atomic(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> JobManifest:
        return from_json(cls, json.loads(Path(path).read_text()))
