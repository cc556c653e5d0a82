"""Write a directory so that it appears complete or not at all: work in `X.partial`, rename to `X` at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path


def partial_dir(out: Path) -> Path:
    """Where `out` is built: a sibling named `out.name + '.partial'`."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def publish(work: Path, out: Path) -> None:
    """Rename the finished `work` to `out`, replacing an older `out`. The old one is moved aside first, so a kill
    between the two renames leaves `out.old` and `work`, never a half-written `out`."""
    out = Path(out)
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    Path(work).rename(out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: Path, *, resume: bool = False) -> Iterator[Path]:
    """Yield `out.partial` to write into; when the block finishes without an exception, it becomes `out`.

    `resume=False` starts from an empty `out.partial`; `resume=True` keeps what an interrupted run left there (the
    caller decides what of it to reuse). On an exception the partial directory stays, for inspection or resume."""
    work = partial_dir(out)
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    yield work
    publish(work, out)


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the new file beside `path`, which it then replaces in one step: a reader (or a rerun after
    a kill) sees the old file or the new one, never a half-written one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(text))
