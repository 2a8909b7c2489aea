"""kvshelf.Client against a real sidecar (`kvshelf serve`, the binary built from this
repository) in front of a real redis-server, over HTTP and gRPC."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

import kvshelf
from conftest import SidecarProcess

ADMIN = "admin-token"
WORKER = "worker-token"


class Sidecar(SidecarProcess):
    """`kvshelf serve` with the tests' namespace (and, with ``tokens``, two tenants)."""

    def __init__(self, redis_url: str, label: str, tokens: bool = False) -> None:
        text = f"""
[store]
url = "{redis_url}"

[[namespaces]]
label = "{label}"
model_id = "kvshelf/test-model"
kv_dtype = "float16"
block_size = 4
layout = {{ num_layers = 2, num_kv_heads = 2, head_dim = 8 }}
"""
        if tokens:
            text += f"""
[[tenants]]
name = "worker"
token = "{WORKER}"
salt = "worker-salt"

[[tenants]]
name = "ops"
token = "{ADMIN}"
admin = true
"""
        super().__init__(text)


@pytest.fixture()
def sidecar(redis, label):
    s = Sidecar(redis.url, label)
    yield s
    s.stop()


def tokens(ns: kvshelf.Namespace, blocks: int, seed: int) -> list[int]:
    return [t * 31 + seed for t in range(blocks * ns.block_size)]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_hash_lookup_put_fetch_delete_round_trip(sidecar, ns, label, protocol):
    c = kvshelf.Client(sidecar.url, protocol=protocol)
    toks = tokens(ns, 3, seed=7)
    hashes = c.hash(label, toks)
    # The sidecar hashes exactly as the library does (no salt without tokens).
    assert hashes == kvshelf.PrefixHasher(ns).hash_prefix(toks)
    assert c.lookup(label, tokens=toks)["hit_blocks"] == 0

    rng = np.random.default_rng(1)
    blocks = [rng.integers(0, 256, ns.block_bytes, dtype=np.uint8) for _ in hashes]
    assert c.put(label, hashes, blocks) == ["stored"] * 3
    assert c.put(label, hashes[:1], blocks[:1]) == ["already_present"]
    found = c.lookup(label, block_hashes=hashes)
    assert found["hit_blocks"] == 3 and found["backend_ok"] and found["block_hashes"] == hashes

    out = [np.zeros(ns.block_bytes, dtype=np.uint8) for _ in hashes]
    assert c.fetch_into(label, hashes, out) == (3, "complete")
    for a, b in zip(blocks, out):
        assert np.array_equal(a, b)
    payloads, reason = c.fetch(label, [h.hex() for h in hashes])
    assert reason == "complete" and payloads == [b.tobytes() for b in blocks]

    # A gap ends the run: block 1 deleted, blocks 0 only.
    assert c.delete(label, hashes[1:2]) == 1
    out = [bytearray(ns.block_bytes) for _ in hashes]
    assert c.fetch_into(label, hashes, out) == (1, "miss")
    assert out[0] == blocks[0].tobytes() and out[1] == bytearray(ns.block_bytes)
    assert c.lookup(label, block_hashes=hashes)["hit_blocks"] == 1

    assert c.pin(label, hashes[0]) is True
    assert c.unpin(label, hashes[0]) is True
    assert c.pin(label, hashes[1]) is False


def test_asynchronous_puts_and_the_async_client(sidecar, ns, label):
    async def run():
        c = kvshelf.AsyncClient(sidecar.url)
        hashes = await c.hash(label, tokens(ns, 2, seed=3))
        blocks = [bytes([i]) * ns.block_bytes for i in range(2)]
        assert await c.put(label, hashes, blocks, asynchronous=True) == ["queued"] * 2
        deadline = time.monotonic() + 10
        while (await c.lookup(label, block_hashes=hashes))["hit_blocks"] < 2:
            assert time.monotonic() < deadline, "queued puts never landed"
            await asyncio.sleep(0.02)  # the sidecar's queue writes in the background
        payloads, reason = await c.fetch(label, hashes)
        assert (payloads, reason) == (blocks, "complete")
        assert await c.delete(label, hashes) == 2

    asyncio.run(run())


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_errors_carry_the_api_code(sidecar, ns, label, protocol):
    c = kvshelf.Client(sidecar.url, protocol=protocol)
    with pytest.raises(kvshelf.KvshelfError) as e:
        c.lookup("no-such-namespace", tokens=[1, 2, 3, 4])
    assert e.value.code == "unknown_namespace"
    h = c.hash(label, tokens(ns, 1, seed=1))
    with pytest.raises(kvshelf.KvshelfError) as e:
        c.put(label, h, [b"short"])
    assert e.value.code == "invalid_input"
    with pytest.raises(ValueError):
        c.fetch_into(label, h, [])  # one hash, no buffer
    with pytest.raises(ValueError):
        kvshelf.Client(sidecar.url, protocol="carrier-pigeon")


def test_an_unreachable_sidecar_is_a_transport_error():
    c = kvshelf.Client("http://127.0.0.1:9", connect_timeout=0.5, timeout=2.0)
    with pytest.raises(kvshelf.KvshelfError) as e:
        c.hash("demo", [1, 2, 3])
    assert e.value.code == "transport"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tokens_select_the_tenant_and_its_rights(redis, ns, label, protocol):
    s = Sidecar(redis.url, label, tokens=True)
    try:
        with pytest.raises(kvshelf.KvshelfError) as e:
            kvshelf.Client(s.url, protocol=protocol).hash(label, [1, 2, 3, 4])
        assert e.value.code == "unauthenticated"
        # A mounted secret's trailing newline is fine.
        worker = kvshelf.Client(s.url, protocol=protocol, token=WORKER + "\n")
        h = worker.hash(label, tokens(ns, 1, seed=5))
        assert h != kvshelf.PrefixHasher(ns).hash_prefix(tokens(ns, 1, seed=5)), "salted"
        assert worker.put(label, h, [bytes(ns.block_bytes)]) == ["stored"]
        with pytest.raises(kvshelf.KvshelfError) as e:
            worker.delete(label, h)
        assert e.value.code == "forbidden"
        assert kvshelf.Client(s.url, protocol=protocol, token=ADMIN).delete(label, h) == 1
    finally:
        s.stop()


def test_stubs_name_the_client():
    for name in ["hash", "lookup", "fetch_into", "fetch", "put", "delete", "pin", "unpin"]:
        assert hasattr(kvshelf.Client, name), name
