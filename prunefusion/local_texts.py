"""Text from sources a Debian + Python machine already has, none of which is in the stdlib corpus: `local:NAME` in a
job's data lists (calibration, heal, evaluate).

    heal:
      data: [local:stdlib, local:man-pages, local:info-manuals, local:debian-descriptions]
    evaluate:
      sets: {out_of_domain: [local:licenses, local:package-readmes, local:debian-changelogs]}

| name | what | where |
|---|---|---|
| stdlib | the stdlib corpus' training split (the default text) | prunefusion/models/corpus.py |
| man-pages | manual pages, troff markup stripped, licence sections left out | /usr/share/man/man[1-8] |
| info-manuals | GNU info manuals, licence nodes and menus left out | /usr/share/info |
| debian-descriptions | the installed packages' long descriptions | /var/lib/dpkg/status |
| package-readmes | the installed Python distributions' long descriptions | importlib.metadata |
| licenses | licence texts | /usr/share/common-licenses, distributions' licence files |
| debian-changelogs | Debian changelogs, first 4,000 characters each | /usr/share/doc/*/changelog.Debian.gz |

What a source holds depends on what is installed (a digest of the texts a job used is in its filter record when it
filters them). Documents come in sorted path order, at most `MAX_DOCUMENTS` per source, each at most `MAX_CHARS`;
as sentences (encoders), `prose_sentences` of them. Standard library only.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from pathlib import Path

PREFIX = "local:"
MAX_DOCUMENTS = 1500
MAX_CHARS = 20_000
LICENCE_WORDS = re.compile(r"licen[cs]e|copyright|warranty", re.IGNORECASE)


def _read(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def _files(pattern: str, root: str) -> list[Path]:
    return sorted(p for p in Path(root).glob(pattern) if p.is_file() and not p.is_symlink())


def _spread(items: list, limit: int = MAX_DOCUMENTS) -> list:
    """At most `limit` items, evenly spread over the sorted list (not only its first letters)."""
    step = max(1, -(-len(items) // limit))
    return items[::step][:limit]


def troff_text(source: str) -> str:
    """A man page's running text: macro lines and escapes dropped, sections about licences and authors left out."""
    paragraphs, current, skipping = [], [], False
    for line in source.splitlines():
        if line.startswith((".SH", ".SS")):
            skipping = bool(LICENCE_WORDS.search(line)) or "AUTHOR" in line.upper()
            paragraphs.append(" ".join(current))
            current = []
        elif line.startswith((".PP", ".P", ".LP", ".TP", ".IP", ".sp", ".br")):
            paragraphs.append(" ".join(current))
            current = []
        elif not line.startswith((".", "'")) and not skipping:
            text = re.sub(r"\\f(\[[^]]*\]|\(..|.)|\\\*(\(..|.)|\\\((..)|\\[&|^%]|\\s[+-]?\d", "", line)
            current.append(text.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " "))
    paragraphs.append(" ".join(current))
    return "\n\n".join(p.strip() for p in paragraphs if p.strip())


def man_pages() -> list[str]:
    paths = [p for section in "12345678" for p in _files(f"man{section}/*.gz", "/usr/share/man")]
    return [text[:MAX_CHARS] for p in _spread(paths) if (text := troff_text(_read(p)))]


def info_manuals() -> list[str]:
    docs = []
    for path in _files("*.info*.gz", "/usr/share/info"):
        for node in _read(path).split("\x1f")[1:]:
            header, _, body = node.lstrip("\n").partition("\n")
            if LICENCE_WORDS.search(header) or "Node:" not in header:
                continue
            body = "\n".join(line for line in body.splitlines() if not line.startswith("* "))
            if len(body.strip()) > 200:
                docs.append(body.strip()[:MAX_CHARS])
    return _spread(docs)


def debian_descriptions(status: Path = Path("/var/lib/dpkg/status")) -> list[str]:
    if not status.is_file():
        return []
    docs = []
    for match in re.finditer(r"^Description: (.*)\n((?: .*\n?)*)", status.read_text(errors="replace"), re.MULTILINE):
        lines = [line[1:] for line in match.group(2).splitlines()]
        body = "\n".join("" if line == "." else line for line in lines)
        docs.append(f"{match.group(1)}.\n\n{body}".strip())
    return _spread(sorted(set(docs)))


def package_readmes() -> list[str]:
    from importlib import metadata

    bodies = {(d.metadata.get_payload() or "").strip() for d in metadata.distributions()}
    return _spread(sorted(b[:MAX_CHARS] for b in bodies if len(b) >= 500))


def licenses() -> list[str]:
    import site

    paths = _files("*", "/usr/share/common-licenses")
    for root in site.getsitepackages():
        paths += [p for p in _files("*.dist-info/**/*", root) if LICENCE_WORDS.search(p.name) or "COPYING" in p.name]
    return _spread(sorted({_read(p)[:MAX_CHARS] for p in paths}))


def debian_changelogs() -> list[str]:
    return _spread([_read(p)[:4000] for p in _files("*/changelog.Debian.gz", "/usr/share/doc")])


def stdlib() -> list[str]:
    from prunefusion.models.corpus import stdlib_corpus

    return stdlib_corpus().train


SOURCES: dict[str, Callable[[], list[str]]] = {
    "stdlib": stdlib,
    "man-pages": man_pages,
    "info-manuals": info_manuals,
    "debian-descriptions": debian_descriptions,
    "package-readmes": package_readmes,
    "licenses": licenses,
    "debian-changelogs": debian_changelogs,
}


def local_texts(name: str, unit: str = "documents") -> list[str]:
    """The documents (or prose sentences) of the local source `name` (a key of SOURCES, with or without local:)."""
    from prunefusion.models.corpus import prose_sentences

    key = name.removeprefix(PREFIX)
    if key not in SOURCES:
        raise ValueError(f"unknown text source {name!r}; the local sources are "
                         f"{', '.join(PREFIX + k for k in SOURCES)}")
    docs = SOURCES[key]()
    if not docs:
        raise ValueError(f"text source {name}: nothing found on this machine")
    return prose_sentences(docs) if unit == "sentences" else docs
