"""The inputs of `prunefusion score` as work units: planned without loading the corpus, read one unit at a time.

    units = plan_units([Path("a.jsonl"), Path("b.parquet"), Path("hf_dir"), Path("page.txt")], docs_per_unit=1024)
    records = read_unit(units[0])          # [{"id": ..., "text": ..., other fields}, ...]

Formats (a table: SOURCES): JSON Lines (`.jsonl`, one object a line with a "text" string; "id" optional, default
FILE:LINE), Parquet (`.parquet`, a "text" column; "id" optional, default FILE:ROW, 1-based), a `datasets`
`save_to_disk` folder (its Arrow files, in the order its state.json lists them; a DatasetDict folder: every split,
in dataset_dict.json's order; default ids ARROW_FILE:ROW), and any other file as one document whose id is its path.
Any other folder stands for its .jsonl, .parquet, .txt and .md files, sorted, found recursively.

A unit is a list of segments (a byte range of a JSONL file, a row range of a Parquet or Arrow file, one text file)
holding at most `docs_per_unit` documents; a segment is never split, so a unit of small files packs several. The
plan depends only on the files and `docs_per_unit`, so every process that plans the same inputs (a Slurm array's
ranks, a Ray driver) gets the same units. Planning reads JSONL files once to find line offsets and only the
metadata of Parquet and Arrow files. Reading a unit touches only its own byte range of a JSONL file; of a Parquet
file it decodes the row groups that hold its rows (write Parquet with row groups of about --batch-size rows, or
every unit decodes a whole large group); Arrow files are memory-mapped and sliced.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Segment:
    kind: str  # a key of SOURCES
    path: str  # absolute: a worker on another node or in another working directory reads the same file
    name: str  # the path as the user gave it: default ids and error messages
    start: int = 0  # jsonl: byte offset; parquet, arrow: first row (0-based)
    stop: int = 0  # jsonl: byte offset past the last line; parquet, arrow: past the last row
    first_line: int = 1  # jsonl: the line number at `start`
    documents: int = 1


@dataclass(frozen=True)
class Unit:
    index: int
    segments: tuple[Segment, ...]

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.segments)

    def to_dict(self) -> dict:
        return {"index": self.index, "segments": [asdict(s) for s in self.segments]}

    @classmethod
    def from_dict(cls, d: dict) -> Unit:
        return cls(d["index"], tuple(Segment(**s) for s in d["segments"]))


def _record(where: str, record: object) -> dict:
    """An input record checked and given its id (its own, else `where`: FILE:LINE or FILE:ROW); ValueError naming
    where it came from and what is wrong."""
    if not isinstance(record, dict) or "text" not in record:
        raise ValueError(f"{where}: expected an object with a 'text' field")
    if not isinstance(record["text"], str):
        raise ValueError(f"{where}: field 'text' must be a string, got {type(record['text']).__name__}")
    doc_id = record.get("id")
    return {**record, "id": where if doc_id is None else str(doc_id), "text": record["text"]}


# --- JSON Lines: lines are split at b"\n" only (the JSON Lines rule; "\r\n" ends a line too) ---

def _plan_jsonl(path: Path, per_unit: int) -> Iterator[Segment]:
    start = offset = 0
    first = number = 1
    documents = 0
    with open(path, "rb") as f:
        for line in f:
            offset += len(line)
            number += 1
            documents += bool(line.strip())
            if documents == per_unit:
                yield Segment("jsonl", str(path.resolve()), str(path), start, offset, first, documents)
                start, first, documents = offset, number, 0
    if documents:
        yield Segment("jsonl", str(path.resolve()), str(path), start, offset, first, documents)


def _read_jsonl(s: Segment) -> list[dict]:
    with open(s.path, "rb") as f:
        f.seek(s.start)
        data = f.read(s.stop - s.start)
    records = []
    for number, raw in enumerate(data.split(b"\n"), s.first_line):
        if not raw.strip():
            continue
        where = f"{s.name}:{number}"
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{where}: not a JSON object ({err})") from None
        records.append(_record(where, record))
    return records


# --- Parquet and Arrow (pyarrow: installed with the quality and ray extras) ---

def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise ValueError("Parquet and datasets inputs need pyarrow: pip install prunefusion[quality]") from None
    return pyarrow


def _row_segments(kind: str, path: Path, rows: int, per_unit: int) -> Iterator[Segment]:
    for start in range(0, rows, per_unit):
        stop = min(rows, start + per_unit)
        yield Segment(kind, str(path.resolve()), str(path), start, stop, documents=stop - start)


def _plan_parquet(path: Path, per_unit: int) -> Iterator[Segment]:
    yield from _row_segments("parquet", path, _pyarrow().parquet.ParquetFile(path).metadata.num_rows, per_unit)


def _arrow_table(path: str):
    pa = _pyarrow()
    return pa.ipc.open_stream(pa.memory_map(path)).read_all()  # memory-mapped: slicing copies only the rows read


def _plan_arrow(path: Path, per_unit: int) -> Iterator[Segment]:
    yield from _row_segments("arrow", path, _arrow_table(str(path)).num_rows, per_unit)


def _rows(s: Segment, table, table_first_row: int = 0) -> list[dict]:
    """The segment's rows of `table`, whose first row is row `table_first_row` of the file."""
    if "text" not in table.column_names:
        raise ValueError(f"{s.name}: no 'text' column (columns: {table.column_names})")
    rows = table.slice(s.start - table_first_row, s.stop - s.start).to_pylist()
    return [_record(f"{s.name}:{s.start + i + 1}", row) for i, row in enumerate(rows)]


def _read_parquet(s: Segment) -> list[dict]:
    pf = _pyarrow().parquet.ParquetFile(s.path)
    groups, first_row, row = [], 0, 0
    for g in range(pf.metadata.num_row_groups):  # read only the row groups that hold [start, stop)
        n = pf.metadata.row_group(g).num_rows
        if row < s.stop and row + n > s.start:
            first_row = row if not groups else first_row
            groups.append(g)
        row += n
    return _rows(s, pf.read_row_groups(groups), first_row)


def _read_arrow(s: Segment) -> list[dict]:
    return _rows(s, _arrow_table(s.path))


# --- plain files: one document each ---

def _plan_text(path: Path, per_unit: int) -> Iterator[Segment]:
    yield Segment("text", str(path.resolve()), str(path))


def _read_text(s: Segment) -> list[dict]:
    return [{"id": s.name, "text": Path(s.path).read_text(errors="replace")}]


SOURCES: dict[str, tuple[Callable[[Path, int], Iterator[Segment]], Callable[[Segment], list[dict]]]] = {
    "jsonl": (_plan_jsonl, _read_jsonl),
    "parquet": (_plan_parquet, _read_parquet),
    "arrow": (_plan_arrow, _read_arrow),
    "text": (_plan_text, _read_text),
}
SUFFIX_KINDS = {".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}


FOLDER_SUFFIXES = (".jsonl", ".parquet", ".txt", ".md")  # what a plain folder contributes


def is_dataset_folder(folder: Path) -> bool:
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def dataset_files(folder: Path) -> list[Path]:
    """A `datasets` save_to_disk folder's Arrow files in order (a DatasetDict: its splits in order)."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        return [f for split in splits for f in dataset_files(folder / split)]
    return [folder / f["filename"] for f in json.loads((folder / "state.json").read_text())["_data_files"]]


def _folder_inputs(folder: Path, exclude: tuple[Path, ...]) -> list[tuple[str, Path]]:
    """A `datasets` folder's Arrow files, or a plain folder's corpus files (FOLDER_SUFFIXES, sorted, recursive,
    hidden ones and those under `exclude` skipped); ValueError when it holds none."""
    if is_dataset_folder(folder):
        return [("arrow", f) for f in dataset_files(folder)]
    excluded = [e.resolve() for e in exclude]
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix in FOLDER_SUFFIXES
                   and not any(part.startswith(".") for part in f.relative_to(folder).parts)
                   and not any(f.resolve().is_relative_to(e) for e in excluded))
    if not files:
        raise ValueError(f"{folder}: no corpus files in it ({', '.join(FOLDER_SUFFIXES)}) and not a `datasets` "
                         "save_to_disk folder")
    return input_files(files)


def input_files(paths: list[Path], exclude: tuple[Path, ...] = ()) -> list[tuple[str, Path]]:
    """(kind, file) for every input, folders expanded (leaving out `exclude`: the run's own outputs and work
    folder, when they sit inside an input folder); ValueError for a missing path."""
    files = []
    for path in paths:
        if path.is_dir():
            files += _folder_inputs(path, exclude)
        elif path.is_file():
            files.append((SUFFIX_KINDS.get(path.suffix, "text"), path))
        else:
            raise ValueError(f"{path}: no such file or folder")
    return files


def plan_units(paths: list[Path], docs_per_unit: int, exclude: tuple[Path, ...] = ()) -> list[Unit]:
    """The inputs' segments packed in input order into units of at most `docs_per_unit` documents."""
    if docs_per_unit < 1:
        raise ValueError(f"documents per unit must be >= 1, got {docs_per_unit}")
    units: list[Unit] = []
    current: list[Segment] = []
    for kind, path in input_files(paths, exclude):
        for segment in SOURCES[kind][0](path, docs_per_unit):
            if current and sum(s.documents for s in current) + segment.documents > docs_per_unit:
                units.append(Unit(len(units), tuple(current)))
                current = []
            current.append(segment)
    if current:
        units.append(Unit(len(units), tuple(current)))
    return units


def read_unit(unit: Unit) -> list[dict]:
    return [record for s in unit.segments for record in SOURCES[s.kind][1](s)]
