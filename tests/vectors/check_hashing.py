#!/usr/bin/env python3
"""Independent checker for kvshelf's prefix-hashing golden vectors.

Written from docs/hashing.md ONLY (no reference to the Rust sources), to prove that the
document alone is enough to reproduce kvshelf's namespace roots and block hashes in another
language. Standard library only.

Usage: python3 tests/vectors/check_hashing.py tests/vectors/hashing.json
Prints `ok <name>` or `FAIL <name>: <what differs>` per vector, then `N passed, M failed`.
Exit code 0 iff there is at least one vector and all of them pass.
"""
import argparse
import hashlib
import json
import struct
import sys


def u32(x):  # 4 bytes little-endian; struct rejects values outside 0..2**32-1
    return struct.pack("<I", x)


def bts(b):  # bytes(b): u32 length prefix, then the bytes
    return u32(len(b)) + b


def field(name, v):  # str(name) || bytes(v)
    return bts(name.encode("utf-8")) + bts(v)


def opt(v):  # absent: b"";  present: 0x01 || v
    return b"" if v is None else b"\x01" + v


def root_hash(ns, salt):
    s = lambda k: ns[k].encode("utf-8")
    lora = ns.get("lora_adapter")
    m = (b"kvshelf.root.v1\0"
         + field("model_id", s("model_id"))
         + field("model_revision", s("model_revision"))
         + field("kv_dtype", s("kv_dtype"))
         + field("num_layers", u32(ns["num_layers"]))
         + field("num_kv_heads", u32(ns["num_kv_heads"]))
         + field("head_dim", u32(ns["head_dim"]))
         + field("tp_size", u32(ns["tp_size"]))
         + field("tp_rank", u32(ns["tp_rank"]))
         + field("layout_order", s("layout_order"))
         + field("block_size", u32(ns["block_size"]))
         + field("lora_adapter", opt(None if lora is None else lora.encode("utf-8")))
         + field("salt", opt(salt)))
    return hashlib.sha256(m).digest()


def block_hashes(root, tokens, block_size, extra_keys):
    out, parent = [], root
    for i in range(len(tokens) // block_size):  # full blocks only
        blk = tokens[i * block_size:(i + 1) * block_size]
        keys = extra_keys[i] if i < len(extra_keys) else []
        m = (b"KVB1" + parent + u32(len(blk)) + b"".join(u32(t) for t in blk)
             + u32(len(keys)) + b"".join(bts(k) for k in keys))
        parent = hashlib.sha256(m).digest()
        out.append(parent)
    return out


def check(v):
    """Return None if the vector matches, else a description of the difference."""
    salt = None if v.get("salt_hex") is None else bytes.fromhex(v["salt_hex"])
    extra = [[bytes.fromhex(h) for h in blk] for blk in v.get("extra_keys_hex", [])]
    root = root_hash(v["namespace"], salt)
    if root.hex() != v["root"].lower():
        return f"root: expected {v['root']}, computed {root.hex()}"
    got = [h.hex() for h in block_hashes(root, v["tokens"], v["namespace"]["block_size"], extra)]
    want = [h.lower() for h in v["block_hashes"]]
    if len(got) != len(want):
        return f"block count: expected {len(want)}, computed {len(got)}"
    for i, (w, g) in enumerate(zip(want, got)):
        if w != g:
            return f"block {i}: expected {w}, computed {g}"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vectors", help="path to hashing.json")
    with open(ap.parse_args().vectors, encoding="utf-8") as f:
        vectors = json.load(f).get("vectors", [])
    passed = failed = 0
    for v in vectors:
        name = v.get("name", "?")
        try:
            err = check(v)
        except Exception as e:  # malformed vector: report, don't crash
            err = f"error: {type(e).__name__}: {e}"
        if err is None:
            passed += 1
            print(f"ok {name}")
        else:
            failed += 1
            print(f"FAIL {name}: {err}")
    print(f"{passed} passed, {failed} failed")
    return 0 if passed > 0 and failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
