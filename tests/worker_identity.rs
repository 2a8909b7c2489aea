//! The end-to-end proof of `kvshelf-worker`: separate worker processes sharing one sidecar
//! and one real Redis produce bitwise the same logits and tokens with and without the shelf.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use kvshelf::Dtype;
use kvshelf::client::Protocol;
use serde_json::Value;
use support::{Sidecar, redis_url, sidecar_config};

const BS: usize = kvshelf::worker::BLOCK_SIZE as usize;

/// A namespace of the worker's model, with a label of its own for this test.
fn ns(dtype: Dtype, test: &str) -> kvshelf::Namespace {
    let mut ns = kvshelf::worker::namespace(dtype);
    let nonce: u32 = rand::random();
    ns.label = format!("w-{test}-{nonce:08x}");
    ns
}

/// A shared prefix of `n` bytes (byte-level tokens).
fn prefix(n: usize) -> String {
    let words = [
        "Once",
        "upon",
        "a",
        "time",
        "two",
        "workers",
        "shared",
        "one",
        "shelf",
        "of",
        "keys",
        "and",
        "values;",
        "neither",
        "recomputed",
        "what",
        "the",
        "other",
        "had",
        "seen.",
    ];
    let mut s = String::new();
    let mut i = 7usize;
    while s.len() < n {
        s.push_str(words[i % words.len()]);
        s.push(' ');
        i = i * 31 % 97 + 3;
    }
    s.truncate(n);
    s
}

struct Run {
    report: Value,
    logits: Vec<u8>,
}

/// Runs the worker binary as its own process.
async fn worker(sidecar: &str, label: &str, dtype: &str, prompt: &str, extra: &[&str]) -> Run {
    let dir = std::env::temp_dir().join(format!("kvshelf-worker-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let logits_path: PathBuf = dir.join(format!("logits-{}.bin", rand::random::<u64>()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvshelf-worker"));
    cmd.args([
        "run",
        "--sidecar",
        sidecar,
        "--namespace",
        label,
        "--dtype",
        dtype,
        "--prompt",
        prompt,
        "--max-new-tokens",
        "6",
        "--json",
        "--logits-out",
    ])
    .arg(&logits_path)
    .args(extra);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run kvshelf-worker"))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "kvshelf-worker failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let logits = std::fs::read(&logits_path).unwrap();
    let _ = std::fs::remove_file(&logits_path);
    Run { report, logits }
}

fn n(v: &Value, key: &str) -> usize {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}")) as usize
}

/// Waits until the sidecar has the first `blocks` blocks of `prompt`.
async fn wait_landed(sidecar: &Sidecar, label: &str, prompt: &str, blocks: usize) {
    let client = sidecar.client(Protocol::Http, None);
    let tokens = kvshelf::worker::tokenize(prompt);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let l = client.lookup_tokens(label, &tokens, false).await.unwrap();
        if l.hit_blocks >= blocks {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {blocks} blocks landed",
            l.hit_blocks
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_same(cached: &Run, fresh: &Run) {
    let vocab = kvshelf::worker::ModelConfig::DEFAULT.vocab;
    assert_eq!(
        cached.logits.len(),
        6 * vocab * 4,
        "6 positions of f32 logits"
    );
    assert!(
        cached.logits == fresh.logits,
        "logits differ with and without the shelf"
    );
    assert_eq!(cached.report["tokens"], fresh.report["tokens"]);
    assert_eq!(n(&fresh.report, "hit_tokens"), 0);
    // Not a degenerate model: the logits of one position are not all equal.
    let first: Vec<f32> = cached.logits[..vocab * 4]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert!(first.iter().any(|&x| x != first[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logits_are_bitwise_identical_with_and_without_the_shelf() {
    let f32_ns = ns(Dtype::Float32, "id");
    let bf16_ns = ns(Dtype::Bfloat16, "id");
    let sidecar = Sidecar::start(sidecar_config(
        Some(redis_url()),
        vec![f32_ns.clone(), bf16_ns.clone()],
    ))
    .await;
    let url = sidecar.url();
    let shared = prefix(200); // 12 full blocks and 8 tokens
    for (ns, dtype) in [(&f32_ns, "f32"), (&bf16_ns, "bf16")] {
        let label = ns.label.as_str();
        // Process A warms the shelf.
        let a_prompt = format!("{shared}Question A: what did the first worker see?");
        let a = worker(&url, label, dtype, &a_prompt, &[]).await;
        assert_eq!(n(&a.report, "hit_tokens"), 0, "{dtype}: cold shelf");
        let a_blocks = a_prompt.len() / BS;
        assert_eq!(n(&a.report, "put_blocks"), a_blocks);
        wait_landed(&sidecar, label, &a_prompt, a_blocks).await;

        // Process B shares the prefix, with another suffix; then again without the shelf.
        let b_prompt = format!("{shared}Question B: and what did the second one do?");
        let b = worker(&url, label, dtype, &b_prompt, &[]).await;
        let b_fresh = worker(&url, label, dtype, &b_prompt, &["--no-cache"]).await;
        let common = a_prompt
            .bytes()
            .zip(b_prompt.bytes())
            .take_while(|(x, y)| x == y)
            .count();
        let shared_blocks = common / BS;
        assert!(shared_blocks >= shared.len() / BS);
        assert_eq!(
            n(&b.report, "hit_tokens"),
            shared_blocks * BS,
            "{dtype}: B reuses every full block of the shared prefix: {}",
            b.report
        );
        assert_eq!(
            n(&b.report, "computed_tokens"),
            b_prompt.len() - shared_blocks * BS
        );
        assert!(b.report["shelf_errors"].as_array().unwrap().is_empty());
        assert_same(&b, &b_fresh);
        // B again, over gRPC: now B's own blocks are on the shelf too (all but the block
        // of the last prompt token, which is always computed).
        wait_landed(&sidecar, label, &b_prompt, b_prompt.len() / BS).await;
        let b_grpc = worker(&url, label, dtype, &b_prompt, &["--grpc"]).await;
        assert_eq!(
            n(&b_grpc.report, "hit_tokens"),
            (b_prompt.len() - 1) / BS * BS
        );
        assert_same(&b_grpc, &b_fresh);
        // A's own prompt once more, from the shelf: the same as A's cold run.
        let a_again = worker(&url, label, dtype, &a_prompt, &[]).await;
        assert!(n(&a_again.report, "hit_tokens") > 0);
        assert!(
            a_again.logits == a.logits,
            "{dtype}: A differs on its second run"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_shorter_than_the_lookup_is_recomputed() {
    let bf16_ns = ns(Dtype::Bfloat16, "short");
    let label = bf16_ns.label.clone();
    let sidecar = Sidecar::start(sidecar_config(Some(redis_url()), vec![bf16_ns])).await;
    let url = sidecar.url();
    let shared = prefix(160); // 10 full blocks
    let a_prompt = format!("{shared} -- first request");
    let a = worker(&url, &label, "bf16", &a_prompt, &[]).await;
    assert_eq!(n(&a.report, "put_blocks"), a_prompt.len() / BS);
    wait_landed(&sidecar, &label, &a_prompt, a_prompt.len() / BS).await;

    // B's lookup finds 10 blocks; block 4 is deleted before B fetches: B gets 4 and
    // recomputes the other 6 (and puts them back).
    let b_prompt = format!("{shared} -- second request, another suffix");
    let b = worker(
        &url,
        &label,
        "bf16",
        &b_prompt,
        &["--delete-after-lookup", "4"],
    )
    .await;
    assert_eq!(n(&b.report, "lookup_blocks"), 10, "{}", b.report);
    assert_eq!(n(&b.report, "fetched_blocks"), 4, "{}", b.report);
    assert_eq!(n(&b.report, "hit_tokens"), 4 * BS);
    assert_eq!(n(&b.report, "computed_tokens"), b_prompt.len() - 4 * BS);
    let b_fresh = worker(&url, &label, "bf16", &b_prompt, &["--no-cache"]).await;
    assert_same(&b, &b_fresh);
}

#[test]
fn examples_worker_toml_has_the_worker_namespaces() {
    let cfg = kvshelf::config::Config::from_toml(include_str!("../examples/worker.toml"))
        .expect("examples/worker.toml parses");
    assert_eq!(
        cfg.namespaces,
        vec![
            kvshelf::worker::namespace(Dtype::Float32),
            kvshelf::worker::namespace(Dtype::Bfloat16),
        ]
    );
    for ns in &cfg.namespaces {
        ns.validate().unwrap();
        assert_eq!(ns.block_shape(), vec![4, 2, 16, 2, 32]);
    }
}

#[test]
fn the_compose_sidecars_serve_the_demo_and_worker_namespaces() {
    let cfg = kvshelf::config::Config::from_toml(include_str!("../docker/sidecar.toml"))
        .expect("docker/sidecar.toml parses");
    assert_eq!(
        cfg.namespaces,
        vec![
            kvshelf::shelf::demo_namespace(),
            kvshelf::worker::namespace(Dtype::Float32),
            kvshelf::worker::namespace(Dtype::Bfloat16),
        ]
    );
}
