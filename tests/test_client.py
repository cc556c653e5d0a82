"""The client library: the asyncio client offers what the blocking one does, with the same signatures."""

from __future__ import annotations

import inspect

from prunefusion_client import AsyncClient, Client


def public_methods(cls) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_")}


def test_async_client_has_every_method_of_the_sync_client_with_the_same_parameters():
    sync, asynchronous = public_methods(Client), public_methods(AsyncClient)
    assert sorted(sync) == sorted(asynchronous)
    for name, signature in sync.items():
        assert list(signature.parameters) == list(asynchronous[name].parameters), name
