"""Typed, strict configuration files: one pydantic base (unknown keys rejected, frozen) and one error formatter that
names every offending field as `models[0].max_batch_size`, for the server config and the compression jobs alike."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pydantic import BaseModel, ConfigDict, ValidationError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def field_path(loc: Iterable[str | int], skip: frozenset[str] = frozenset()) -> str:
    """('models', 0, 'torch', 'path') -> 'models[0].path' when 'torch' is a union tag in `skip` (a tag stands right
    after the list index of the item it selected)."""
    loc = list(loc)
    parts = [p for i, p in enumerate(loc) if not (p in skip and i > 0 and isinstance(loc[i - 1], int))]
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or "(top level)"


def validation_problems(error: ValidationError, *, tags: frozenset[str] = frozenset(), tag_field: str = "",
                        unknown_key_hint: Callable[[str], str] = lambda key: "") -> list[str]:
    """One 'where: what' line per problem in a pydantic error. pydantic puts a tagged union's tag into the location
    (models.0.torch.max_batch): tags in `tags` are left out; a wrong or missing tag is reported at `tag_field`.
    `unknown_key_hint(key)` may add a reason to an unknown key's message (e.g. which other kind takes it)."""
    lines = []
    for e in error.errors():
        where, message = field_path(e["loc"], tags), e["msg"]
        if e["type"] == "union_tag_invalid":
            where, message = f"{where}.{tag_field}", (f"unknown {tag_field} {e['ctx']['tag']!r}; choose one of "
                                                      f"{e['ctx']['expected_tags']}")
        elif e["type"] == "union_tag_not_found":
            message = f"must be a mapping of settings, not {type(e['input']).__name__} {e['input']!r}"
        elif e["type"] == "extra_forbidden" and e["loc"] and (hint := unknown_key_hint(str(e["loc"][-1]))):
            message = f"{message} ({hint})"
        lines.append(f"{where}: {message}")
    return lines
