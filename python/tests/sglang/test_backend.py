"""kvshelf as SGLang's HiCache L3 backend, driven through SGLang's real classes on CPU
(see sglang_env.py): the factory builds it from the ``dynamic`` extra-config, pages
round-trip byte-exact between SGLang host pools through the zero-copy ``batch_*_v1``
methods, ``batch_exists`` counts leading pages, and a page that is corrupt or partly gone
is ``False``, never wrong bytes."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch

import kvshelf
from kvshelf.sglang import KvshelfHiCacheStorage, storage_identity
from sglang_env import (guard, PAGE, extra_config, fill_random, make_backend,  # noqa: F401
                        make_pool, page_keys, pages, region_bytes, storage_config, two_instances)

LAYOUTS = [("mha", "page_first"), ("mha", "layer_first"), ("mha", "page_first_direct"),
           ("mla", "page_first"), ("mla", "layer_first")]


def test_the_factory_builds_the_backend_from_the_dynamic_extra_config(redis, label):
    pool = make_pool()
    backend = make_backend(pool, extra_config(redis.url, label))
    assert isinstance(backend, KvshelfHiCacheStorage)
    assert backend.interface_v1 and backend.parts == 2  # page_first MHA: K and V regions
    assert backend.ns.hash_scheme == "sglang" and backend.ns.label == label


@pytest.mark.parametrize("kind,layout", LAYOUTS, ids=[f"{k}-{l}" for k, l in LAYOUTS])
def test_pages_round_trip_byte_exact_between_two_host_pools(redis, label, kind, layout):
    src, dst = make_pool(kind, layout), make_pool(kind, layout)
    writer = make_backend(src, extra_config(redis.url, label), mla=kind == "mla")
    reader = make_backend(dst, extra_config(redis.url, label), mla=kind == "mla")
    keys = page_keys(6)
    at = src.alloc(6 * PAGE)
    fill_random(src, at, seed=1)
    assert writer.batch_set_v1(keys, at) == [True] * 6
    # Written again: already there, still a success.
    assert writer.batch_set_v1(keys, at) == [True] * 6
    into = dst.alloc(6 * PAGE)
    assert reader.batch_exists(keys) == 6
    assert reader.batch_get_v1(keys, into) == [True] * 6
    assert pages(dst, into) == pages(src, at)
    assert region_bytes(dst, into) == region_bytes(src, at)


def test_pages_land_at_the_host_indices_given_and_nowhere_else(redis, label):
    src, dst, w, r, keys, at = two_instances(extra_config(redis.url, label), 3, seed=2)
    assert w.batch_set_v1(keys, at) == [True] * 3
    dst.alloc(5 * PAGE)  # the reader's free pages start further on
    into = dst.alloc(3 * PAGE)
    before = dst.kv_buffer.clone()
    assert r.batch_get_v1(keys, into) == [True] * 3
    assert pages(dst, into) == pages(src, at)
    # Outside those pages (page_first: kv_buffer is [K/V, token, layer, head, dim]) the
    # pool is byte-identical.
    after = dst.kv_buffer.clone()
    for i in range(0, into.numel(), PAGE):
        t = int(into[i])
        after[:, t:t + PAGE] = 0
        before[:, t:t + PAGE] = 0
    assert torch.equal(after.view(torch.uint8), before.view(torch.uint8))


def test_batch_exists_counts_leading_pages_in_one_call(redis, label):
    pool = make_pool()
    b = make_backend(pool, extra_config(redis.url, label))
    keys = page_keys(8, seed=3)
    at = pool.alloc(8 * PAGE)
    fill_random(pool, at, seed=3)
    stored = [0, 1, 2, 4, 5]  # page 3 missing
    for i in stored:
        assert b.batch_set_v1([keys[i]], at[i * PAGE:(i + 1) * PAGE]) == [True]
    assert b.batch_exists(keys) == 3
    assert b.batch_exists(keys[4:]) == 2
    assert b.batch_exists(keys[3:]) == 0
    assert b.batch_exists([]) == 0
    # One region of page 1 gone (its V): page 1 is no longer there, so 1 leading page.
    v_key = kvshelf.block_key(label, kvshelf.sglang_key_hash(b.identity_v1, keys[1], 1))
    assert redis.cli("DEL", v_key).strip() == b"1"
    assert b.batch_exists(keys) == 1
    # A single lookup answers a whole batch of 128 pages.
    assert b.batch_exists(page_keys(128, seed=4)) == 0


def test_a_corrupt_or_unlinked_page_is_false_never_wrong_bytes(redis, label):
    src, dst, w, r, keys, at = two_instances(extra_config(redis.url, label), 4, seed=5)
    assert w.batch_set_v1(keys, at) == [True] * 4
    k1 = kvshelf.block_key(label, kvshelf.sglang_key_hash(w.identity_v1, keys[1], 0))
    k2 = kvshelf.block_key(label, kvshelf.sglang_key_hash(w.identity_v1, keys[2], 1))
    # Page 1: one payload byte flipped at its end (past the header). Page 2: a region gone.
    length = int(redis.cli("STRLEN", k1))
    last = redis.cli("GETRANGE", k1, str(length - 1), str(length - 1))[:1]
    redis.cli("SETRANGE", k1, str(length - 1), bytes([last[0] ^ 0xFF]).decode("latin-1"))
    assert redis.cli("DEL", k2).strip() == b"1"
    into = dst.alloc(4 * PAGE)
    assert r.batch_get_v1(keys, into) == [True, False, False, True]
    got, want = pages(dst, into), pages(src, at)
    assert got[0] == want[0] and got[3] == want[3]


@pytest.mark.parametrize("layout", ["page_first", "layer_first"])
def test_mla_pages_are_written_once_and_read_by_every_rank(redis, label, layout):
    pools = [make_pool("mla", layout) for _ in range(3)]
    ranks = [make_backend(p, extra_config(redis.url, label), mla=True, tp_rank=r, tp_size=3)
             for r, p in enumerate(pools)]
    assert [b.is_writer for b in ranks] == [True, False, False]
    assert len({b.identity_v1 for b in ranks}) == 1  # one copy for every rank
    keys = page_keys(3, seed=6)
    at = [p.alloc(3 * PAGE) for p in pools]
    for r, p in enumerate(pools):
        fill_random(p, at[r], seed=60 + r)
    # Ranks 1 and 2 write nothing (and say so by succeeding: the writer stores the page).
    assert ranks[1].batch_set_v1(keys, at[1]) == [True] * 3
    assert ranks[2].batch_set_v1(keys, at[2]) == [True] * 3
    assert ranks[0].batch_exists(keys) == 0
    assert redis.cli("KEYS", f"kvshelf:v1:{label}:*").strip() == b""
    assert ranks[0].batch_set_v1(keys, at[0]) == [True] * 3
    for r in (1, 2):
        into = pools[r].alloc(3 * PAGE)
        assert ranks[r].batch_get_v1(keys, into) == [True] * 3
        assert pages(pools[r], into) == pages(pools[0], at[0])


def test_mha_ranks_hold_their_own_pages(redis, label):
    pools = [make_pool(), make_pool()]
    ranks = [make_backend(p, extra_config(redis.url, label), tp_rank=r, tp_size=2)
             for r, p in enumerate(pools)]
    keys = page_keys(2, seed=7)
    at = pools[0].alloc(2 * PAGE)
    fill_random(pools[0], at, seed=7)
    assert ranks[0].batch_set_v1(keys, at) == [True] * 2
    assert ranks[1].batch_exists(keys) == 0
    assert ranks[1].batch_get_v1(keys, pools[1].alloc(2 * PAGE)) == [False] * 2


def test_the_identity_separates_layouts_dtypes_and_models(redis, label):
    base = make_backend(make_pool(), extra_config(redis.url, label))
    others = [make_backend(make_pool(layout="layer_first"), extra_config(redis.url, label)),
              make_backend(make_pool(dtype=torch.float16), extra_config(redis.url, label)),
              make_backend(make_pool(page=8), extra_config(redis.url, label))]
    ids = {base.identity_v1} | {o.identity_v1 for o in others}
    assert len(ids) == 4
    cfg = storage_config({}, pool=make_pool())
    cfg.model_name = "another/model"
    assert storage_identity(cfg, make_pool(), 2) != base.identity_v1


def test_the_identity_text_and_key_hash_are_as_documented():
    """docs/hashing.md §10: the identity of a page_first Llama-3-8B rank, and the golden
    value, also computed with the standard library."""
    pool = make_pool(page=64, layers=1, heads=1, dim=8)
    cfg = storage_config({}, pool=pool)
    cfg.model_name = "meta-llama/Meta-Llama-3-8B"
    ident = storage_identity(cfg, pool, 2)
    assert ident == ("model=meta-llama/Meta-Llama-3-8B\npage_size=64\nkv_dtype=bfloat16\n"
                     "layout=page_first\nmla=0\ntp=0/1\npp=0/1\ncp=0/1\ndcp=0/1\nparts=2\n"
                     "format=")
    key = "0123456789abcdef" * 4
    golden = "6d3afb600c17c0bf7779b065ba6121d4316c13bcb49fa779462c7329d7300c78"
    assert kvshelf.sglang_key_hash(ident, key, 1).hex() == golden

    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<I", len(b)) + b

    stdlib = hashlib.sha256(b"kvshelf.sglang\0\0" + s(ident) + s(key) + struct.pack("<I", 1))
    assert stdlib.hexdigest() == golden
    with pytest.raises(ValueError):
        kvshelf.sglang_key_hash(ident, "", 0)
    # The batch form: page-major, the same hashes.
    keys = [key, "fedcba9876543210" * 4]
    assert kvshelf.sglang_key_hashes(ident, keys, 3) == \
           [kvshelf.sglang_key_hash(ident, k, p) for k in keys for p in range(3)]


def test_the_plain_methods_round_trip_flat_pages(redis, label):
    extra = extra_config(redis.url, label)
    extra.pop("interface_v1")
    src, dst = make_pool(layout="layer_first"), make_pool(layout="layer_first")
    w, r = make_backend(src, extra), make_backend(dst, dict(extra))
    keys = page_keys(3, seed=8)
    at = src.alloc(3 * PAGE)
    fill_random(src, at, seed=8)
    values = [src.get_data_page(int(at[i * PAGE]), flat=True) for i in range(3)]
    assert w.batch_set(keys, values) is True
    assert w.set(keys[0], values[0]) is True
    assert r.exists(keys[2]) and not r.exists(page_keys(1, seed=9)[0])
    assert r.batch_exists(keys) == 3
    got = r.batch_get(keys, [dst.get_dummy_flat_data_page() for _ in keys])
    assert [g.view(torch.uint8).numpy().tobytes() for g in got] == \
           [v.contiguous().view(torch.uint8).numpy().tobytes() for v in values]
    one = r.get(keys[1], dst.get_dummy_flat_data_page())
    # Random bytes are not all numbers as bf16 (NaN != NaN): compare bytes.
    assert one.view(torch.uint8).numpy().tobytes() == \
           values[1].contiguous().view(torch.uint8).numpy().tobytes()
    assert r.get(page_keys(1, seed=9)[0], dst.get_dummy_flat_data_page()) is None


def test_hybrid_pools_are_refused_at_attach(redis, label):
    b = make_backend(make_pool(), extra_config(redis.url, label))
    with pytest.raises(NotImplementedError, match="hybrid"):
        b.register_mem_host_pool_v2(make_pool(), "mamba")


def test_a_bad_index_count_is_false_not_an_exception(redis, label):
    pool = make_pool()
    b = make_backend(pool, extra_config(redis.url, label))
    keys = page_keys(2, seed=10)
    at = pool.alloc(2 * PAGE)
    assert b.batch_get_v1(keys, at[:PAGE]) == [False, False]
    assert b.batch_set_v1(keys, at[:PAGE + 1]) == [False, False]
    assert b.batch_get_v1([], at[:0]) == [] and b.batch_set_v1([], at[:0]) == []


def test_unsupported_configurations_are_refused_when_sglang_builds_the_backend(redis, label):
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    pool = make_pool()
    for extra, match in ((extra_config(redis.url, label, backend="memcached"), "backend"),
                         (extra_config(redis.url, label, timeout=0), "timeout")):
        with pytest.raises(ValueError, match=match):
            StorageBackendFactory.create_backend("dynamic", storage_config(extra, pool=pool), pool)
    cfg = storage_config(extra_config(redis.url, label), pool=pool)
    cfg.should_split_heads = True
    with pytest.raises(ValueError, match="heterogeneous"):
        StorageBackendFactory.create_backend("dynamic", cfg, pool)
    cfg = storage_config(extra_config(redis.url, label), pool=pool, mla=True, tp_size=2)
    cfg.dcp_size, cfg.logical_page_size = 2, 2 * PAGE
    with pytest.raises(ValueError, match="dcp_size"):
        StorageBackendFactory.create_backend("dynamic", cfg, pool)
