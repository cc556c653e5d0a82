"""The client library: the asyncio client offers what the blocking one does, with the same signatures."""

from __future__ import annotations

import inspect

import pytest

from prunefusion_client import AsyncClient, Client


def public_methods(cls) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_")}


def test_async_client_has_every_method_of_the_sync_client_with_the_same_parameters():
    sync, asynchronous = public_methods(Client), public_methods(AsyncClient)
    assert sorted(sync) == sorted(asynchronous)
    for name, signature in sync.items():
        assert list(signature.parameters) == list(asynchronous[name].parameters), name


def test_several_replica_addresses_become_one_balanced_target():
    from prunefusion_client.connection import channel_target

    assert channel_target("localhost:50051") == "localhost:50051"
    assert channel_target("127.0.0.1:1,127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    assert channel_target("dns:///prunefusion-headless:50051") == "dns:///prunefusion-headless:50051"
    with pytest.raises(ValueError, match="dns:///NAME:PORT"):
        channel_target("replica-a:50051,replica-b:50051")
