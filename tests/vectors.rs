//! Golden vectors of the hashing contract (`docs/hashing.md`).
//!
//! `hashing_vectors_match_golden_file` recomputes every vector in Rust and compares with the
//! committed `tests/vectors/hashing.json`; `python_recomputes_vectors_from_the_doc` runs the
//! independent Python implementation over the same file. Regenerate the file (only for a
//! deliberate, versioned change of the contract) with
//! `KVSHELF_BLESS=1 cargo test --test vectors`.

use std::path::PathBuf;
use std::process::Command;

use kvshelf::namespace::Namespace;
use kvshelf::{Dtype, Layout, PrefixHasher};
use serde_json::{Value, json};

fn golden_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/hashing.json")
}

struct Case {
    name: &'static str,
    ns: Namespace,
    salt: Option<Vec<u8>>,
    tokens: Vec<u32>,
    extras: Vec<Vec<Vec<u8>>>,
}

fn ns(model: &str, dtype: Dtype, block_size: u32) -> Namespace {
    Namespace {
        label: "vectors".into(),
        model_id: model.into(),
        model_revision: "main".into(),
        kv_dtype: dtype,
        layout: Layout {
            num_layers: 24,
            num_kv_heads: 2,
            head_dim: 64,
            tp_size: 1,
            tp_rank: 0,
            order: "lkthd".into(),
        },
        block_size,
        lora_adapter: None,
        ttl: None,
        max_pinned_bytes: None,
        hash_scheme: Default::default(),
    }
}

/// A deterministic pseudo-random token stream (xorshift), spanning the whole u32 range.
fn tokens(n: usize, seed: u32, max: u32) -> Vec<u32> {
    let mut x = seed.max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x % max
        })
        .collect()
}

fn cases() -> Vec<Case> {
    let qwen = || ns("Qwen/Qwen2.5-0.5B-Instruct", Dtype::Bfloat16, 16);
    let case = |name, ns, tokens| Case {
        name,
        ns,
        salt: None,
        tokens,
        extras: vec![],
    };
    let mut v = vec![];

    let mut worked = ns("m", Dtype::Float16, 1);
    worked.model_revision = String::new();
    worked.layout = Layout {
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: 1,
        tp_size: 1,
        tp_rank: 0,
        order: "lkthd".into(),
    };
    v.push(case("worked-example", worked, vec![42]));
    v.push(case("empty-prompt", qwen(), vec![]));
    v.push(case("partial-block-only", qwen(), (0..15).collect()));
    v.push(case("one-block", qwen(), (0..16).collect()));
    v.push(case("two-blocks-and-partial", qwen(), (0..40).collect()));
    v.push(case(
        "block-size-1",
        ns("m1", Dtype::Float32, 1),
        tokens(7, 1, 151_936),
    ));
    v.push(case("block-size-16", qwen(), tokens(64, 2, 151_936)));
    v.push(case(
        "block-size-256",
        ns("meta-llama/Llama-3.1-8B", Dtype::Bfloat16, 256),
        tokens(600, 3, 128_256),
    ));
    v.push(case(
        "tokens-near-u32-max",
        qwen(),
        (0..32).map(|i| u32::MAX - i).collect(),
    ));
    v.push(case(
        "token-zero-and-max",
        ns("m", Dtype::Int8, 2),
        vec![0, u32::MAX, u32::MAX, 0],
    ));
    v.push(case("prompt-4096-tokens", qwen(), tokens(4096, 4, 151_936)));
    v.push(case(
        "prompt-4096-tokens-block-256",
        ns("meta-llama/Llama-3.1-8B", Dtype::Bfloat16, 256),
        tokens(4096, 4, 128_256),
    ));

    for (name, salt) in [
        ("salt", b"tenant-a".to_vec()),
        ("salt-empty", vec![]),
        ("salt-binary", vec![0, 1, 2, 255, 254]),
    ] {
        v.push(Case {
            salt: Some(salt),
            ..case(name, qwen(), tokens(48, 5, 151_936))
        });
    }
    let mut lora = qwen();
    lora.lora_adapter = Some("sql-lora".into());
    v.push(case("lora", lora.clone(), tokens(48, 5, 151_936)));
    lora.lora_adapter = Some(String::new());
    v.push(case("lora-empty-name", lora, tokens(48, 5, 151_936)));
    let mut both = qwen();
    both.lora_adapter = Some("ab".into());
    v.push(Case {
        salt: Some(b"c".to_vec()),
        ..case("lora-and-salt-ab-c", both.clone(), tokens(16, 6, 9))
    });
    both.lora_adapter = Some("a".into());
    v.push(Case {
        salt: Some(b"bc".to_vec()),
        ..case("lora-and-salt-a-bc", both, tokens(16, 6, 9))
    });

    let img = |s: &str| -> Vec<u8> { s.bytes().cycle().take(32).collect() };
    v.push(Case {
        extras: vec![
            vec![],
            vec![img("image-0")],
            vec![img("image-0"), img("image-1")],
        ],
        ..case("extra-keys", qwen(), tokens(64, 7, 151_936))
    });
    v.push(Case {
        extras: vec![vec![b"ab".to_vec(), b"c".to_vec()]],
        ..case("extra-keys-ab-c", qwen(), tokens(16, 8, 151_936))
    });
    v.push(Case {
        extras: vec![vec![b"a".to_vec(), b"bc".to_vec()]],
        ..case("extra-keys-a-bc", qwen(), tokens(16, 8, 151_936))
    });

    let mut tp = qwen();
    tp.layout = Layout {
        num_layers: 32,
        num_kv_heads: 8,
        head_dim: 128,
        tp_size: 4,
        tp_rank: 3,
        order: "tlkhd".into(),
    };
    v.push(case("tensor-parallel-rank-3", tp, tokens(32, 9, 128_256)));
    for d in Dtype::ALL {
        v.push(Case {
            name: Box::leak(format!("dtype-{}", d.name()).into_boxed_str()),
            ..case("", ns("m", d, 4), vec![1, 2, 3, 4])
        });
    }
    let mut rev = qwen();
    rev.model_id = "模型/ünïcode".into();
    rev.model_revision = "v1.0".into();
    v.push(case("unicode-model-id", rev, tokens(16, 10, 151_936)));
    v
}

fn compute(c: &Case) -> Value {
    let h = PrefixHasher::new(&c.ns, c.salt.as_deref());
    let hashes = h.hash_prefix_with_extras(&c.tokens, &c.extras).unwrap();
    let l = &c.ns.layout;
    json!({
        "name": c.name,
        "namespace": {
            "model_id": c.ns.model_id,
            "model_revision": c.ns.model_revision,
            "kv_dtype": c.ns.kv_dtype.name(),
            "num_layers": l.num_layers,
            "num_kv_heads": l.num_kv_heads,
            "head_dim": l.head_dim,
            "tp_size": l.tp_size,
            "tp_rank": l.tp_rank,
            "layout_order": l.order,
            "block_size": c.ns.block_size,
            "lora_adapter": c.ns.lora_adapter,
        },
        "salt_hex": c.salt.as_ref().map(hex::encode),
        "tokens": c.tokens,
        "extra_keys_hex": c.extras.iter()
            .map(|b| b.iter().map(hex::encode).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "root": h.root().to_hex(),
        "block_hashes": hashes.iter().map(|x| x.to_hex()).collect::<Vec<_>>(),
    })
}

fn computed() -> Value {
    json!({
        "spec": "docs/hashing.md",
        "vectors": cases().iter().map(compute).collect::<Vec<_>>(),
    })
}

#[test]
fn hashing_vectors_match_golden_file() {
    let now = computed();
    if std::env::var_os("KVSHELF_BLESS").is_some() {
        let mut text = serde_json::to_string_pretty(&now).unwrap();
        text.push('\n');
        std::fs::write(golden_path(), text).unwrap();
    }
    let golden: Value = serde_json::from_slice(&std::fs::read(golden_path()).unwrap()).unwrap();
    let (g, n) = (&golden["vectors"], &now["vectors"]);
    assert!(
        g.as_array().unwrap().len() >= 20,
        "the contract asks for at least 20 vectors"
    );
    assert_eq!(g.as_array().unwrap().len(), n.as_array().unwrap().len());
    for (g, n) in g.as_array().unwrap().iter().zip(n.as_array().unwrap()) {
        assert_eq!(
            g, n,
            "vector {} changed: the hashing contract is broken",
            g["name"]
        );
    }
}

#[test]
fn vectors_cover_the_contract() {
    let golden: Value = serde_json::from_slice(&std::fs::read(golden_path()).unwrap()).unwrap();
    let vectors = golden["vectors"].as_array().unwrap();
    let any = |f: &dyn Fn(&Value) -> bool| vectors.iter().any(f);
    assert!(any(&|v| !v["salt_hex"].is_null()));
    assert!(any(&|v| !v["namespace"]["lora_adapter"].is_null()));
    assert!(any(&|v| v["extra_keys_hex"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| !e.as_array().unwrap().is_empty())));
    for bs in [1, 16, 256] {
        assert!(
            any(&|v| v["namespace"]["block_size"] == bs),
            "block size {bs}"
        );
    }
    assert!(any(&|v| v["tokens"]
        .as_array()
        .unwrap()
        .contains(&json!(u32::MAX))));
    assert!(any(&|v| v["tokens"].as_array().unwrap().len() == 4096));
    let hashes: std::collections::HashSet<&str> = vectors
        .iter()
        .flat_map(|v| {
            v["block_hashes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h.as_str().unwrap())
        })
        .collect();
    assert!(
        hashes.len() > 300,
        "vectors hash many distinct blocks: {}",
        hashes.len()
    );
}

#[test]
fn python_recomputes_vectors_from_the_doc() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/check_hashing.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(golden_path())
        .output()
        .expect("python3 must be installed to check the hashing contract");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}

#[test]
fn the_python_snippet_in_the_doc_is_right() {
    // Runs the ```python block of docs/hashing.md §6 over every golden vector's root.
    let program = r#"
import json, re, sys
doc = open(sys.argv[1]).read()
snippet = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
env = {}
exec(snippet, env)
vectors = json.load(open(sys.argv[2]))["vectors"]
for v in vectors:
    extras = [[bytes.fromhex(e) for e in blk] for blk in v["extra_keys_hex"]]
    got = env["block_hashes"](bytes.fromhex(v["root"]), v["tokens"],
                              v["namespace"]["block_size"], extras)
    assert [h.hex() for h in got] == v["block_hashes"], v["name"]
print(len(vectors), "vectors ok")
"#;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg("-c")
        .arg(program)
        .arg(root.join("docs/hashing.md"))
        .arg(golden_path())
        .output()
        .expect("python3 must be installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
