"""Names of objects to import when they are used: "package.module:name" (as vLLM's model registry names its models),
so tables can list heavy code without importing it."""

from __future__ import annotations

import importlib


def resolve(ref: str):
    """"package.module:name" -> the object."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)
