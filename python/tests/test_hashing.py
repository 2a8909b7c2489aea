"""The hashing contract from Python: the golden vectors of tests/vectors/hashing.json, the
LMCache key mapping of docs/hashing.md §8 and the vLLM and SGLang ones of §9 and §10."""

import hashlib
import json
import struct

import pytest

import kvshelf
from conftest import REPO

VECTORS = json.loads((REPO / "tests/vectors/hashing.json").read_text())["vectors"]


def namespace_of(v: dict) -> kvshelf.Namespace:
    n = v["namespace"]
    return kvshelf.Namespace(
        label="golden", model_id=n["model_id"], model_revision=n["model_revision"],
        kv_dtype=n["kv_dtype"], num_layers=n["num_layers"], num_kv_heads=n["num_kv_heads"],
        head_dim=n["head_dim"], tp_size=n["tp_size"], tp_rank=n["tp_rank"],
        order=n["layout_order"], block_size=n["block_size"], lora_adapter=n["lora_adapter"],
    )


def test_there_are_golden_vectors():
    assert len(VECTORS) >= 5


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_golden_vector(v):
    salt = None if v.get("salt_hex") is None else bytes.fromhex(v["salt_hex"])
    hasher = kvshelf.PrefixHasher(namespace_of(v), salt)
    assert hasher.root.hex() == v["root"].lower()
    extras = [[bytes.fromhex(e) for e in blk] for blk in v.get("extra_keys_hex", [])]
    got = hasher.hash_prefix(v["tokens"], extras if extras else None)
    assert [h.hex() for h in got] == [h.lower() for h in v["block_hashes"]]


def test_lmcache_key_hash_matches_the_document():
    key = ("Qwen/Qwen3-8B@00000000@0@"
           "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
    golden = "35ab7b8c4c367b84f173de2259b439afcf7318d9c57963b2eee6988a9ab69725"
    assert kvshelf.lmcache_key_hash(key).hex() == golden
    k = key.encode()
    stdlib = hashlib.sha256(b"kvshelf.lmcache\0" + struct.pack("<I", len(k)) + k).hexdigest()
    assert stdlib == golden
    assert kvshelf.block_key("lmc", bytes.fromhex(golden)) == f"kvshelf:v1:lmc:{golden}"
    assert kvshelf.lmcache_key_hash(key + "@salt") != kvshelf.lmcache_key_hash(key)


@pytest.mark.parametrize("bad", ["", "a@b@c", "a@@b@c", "x@" * 600])
def test_malformed_lmcache_keys_are_value_errors(bad):
    with pytest.raises(ValueError):
        kvshelf.lmcache_key_hash(bad)


def test_invalid_namespace_is_a_value_error():
    with pytest.raises(ValueError, match="label"):
        kvshelf.Namespace(label="a:b", model_id="m", kv_dtype="bf16",
                          num_layers=1, num_kv_heads=1, head_dim=1)
    with pytest.raises(ValueError, match="dtype"):
        kvshelf.Namespace(label="a", model_id="m", kv_dtype="int4",
                          num_layers=1, num_kv_heads=1, head_dim=1)


def test_vllm_key_hash_matches_the_document():
    """docs/hashing.md §9: the golden identity and key hash, and the standard-library
    recipe of that section."""
    def u32(x): return struct.pack("<I", x)
    def bts(b): return u32(len(b)) + b
    def field(name, v): return bts(name.encode()) + bts(v)

    fields = dict(model="Qwen/Qwen3-8B", kv_dtype="bfloat16", tokens_per_hash=16,
                  blocks_per_chunk=1, chunk_bytes=2359296)
    ident = kvshelf.vllm_identity(**fields)
    assert ident.hex() == "86869979874a406e845ef079205a22f7bd2680c52cc3deb4d4bcca84103c8247"
    m = (b"kvshelf.vllm.id\0" + field("model", b"Qwen/Qwen3-8B") + field("kv_dtype", b"bfloat16")
         + field("tokens_per_hash", u32(16)) + field("blocks_per_chunk", u32(1))
         + field("chunk_bytes", struct.pack("<Q", 2359296)) + field("tp_size", u32(1))
         + field("pp_size", u32(1)) + field("pcp_size", u32(1)) + field("dcp_size", u32(1))
         + field("rank", u32(0)) + field("extra", b""))
    assert hashlib.sha256(m).digest() == ident
    key = bytes(range(32)) + (0).to_bytes(4, "big")
    golden = "e3d29e2ca62d7a9ad29af0184612c2373107c6f81d9a92b02f8daecc52adfb64"
    assert kvshelf.vllm_key_hash(ident, key).hex() == golden
    assert hashlib.sha256(b"kvshelf.vllm.v1\0" + ident + bts(key)).hexdigest() == golden
    # Any identity field changes every key.
    for change in (dict(rank=1), dict(tp_size=2), dict(kv_dtype="float16"), dict(extra="g")):
        other = kvshelf.vllm_identity(**{**fields, **change})
        assert kvshelf.vllm_key_hash(other, key).hex() != golden
    with pytest.raises(ValueError):
        kvshelf.vllm_key_hash(ident, b"abcd")
    with pytest.raises(ValueError):
        kvshelf.vllm_key_hash(b"short", key)


def test_sglang_key_hash_matches_the_document():
    """docs/hashing.md §10, without SGLang: the golden value, the standard library's digest
    and the batch form (the SGLang backend's own tests are in tests/sglang)."""
    ident = ("model=meta-llama/Meta-Llama-3-8B\npage_size=64\nkv_dtype=bfloat16\n"
             "layout=page_first\nmla=0\ntp=0/1\npp=0/1\ncp=0/1\ndcp=0/1\nparts=2\nformat=")
    key = "0123456789abcdef" * 4
    golden = "6d3afb600c17c0bf7779b065ba6121d4316c13bcb49fa779462c7329d7300c78"
    assert kvshelf.sglang_key_hash(ident, key, 1).hex() == golden

    def s(x: str) -> bytes:
        return struct.pack("<I", len(x.encode())) + x.encode()

    assert hashlib.sha256(b"kvshelf.sglang\0\0" + s(ident) + s(key)
                          + struct.pack("<I", 1)).hexdigest() == golden
    assert kvshelf.sglang_key_hashes(ident, [key, key[::-1]], 2) == [
        kvshelf.sglang_key_hash(ident, k, p) for k in (key, key[::-1]) for p in (0, 1)]
    for bad_ident, bad_key in (("", key), (ident, ""), ("a\0b", key), (ident, "k" * 1025)):
        with pytest.raises(ValueError):
            kvshelf.sglang_key_hash(bad_ident, bad_key, 0)
