//! `kvshelf-worker`: a small Llama-style model on CPU that reuses prefill KV blocks through
//! a kvshelf sidecar (`docs/worker.md`).

/// mimalloc, as in `kvshelf`: fetched blocks are MiB-sized buffers.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kvshelf::Dtype;
use kvshelf::client::{Client, ClientConfig, Protocol};
use kvshelf::worker::{self, Model, ModelConfig, RunOptions, Worker, bench};

#[derive(Parser)]
#[command(
    version,
    about = "An inference worker on CPU that shares prefill KV through kvshelf"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Shelf {
    /// The sidecar's base URL.
    #[arg(long, env = "KVSHELF_SIDECAR", default_value = "http://127.0.0.1:7070")]
    sidecar: String,
    /// Namespace label on the sidecar (default: kvshelf-worker-f32 / kvshelf-worker-bf16).
    #[arg(long)]
    namespace: Option<String>,
    /// KV cache dtype: f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Speak gRPC instead of HTTP.
    #[arg(long)]
    grpc: bool,
    /// Bearer token, when the sidecar has tokens configured (and no salt for it).
    #[arg(long, env = "KVSHELF_TOKEN")]
    token: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve one prompt: reuse cached KV, prefill the rest, decode greedily.
    Run {
        #[command(flatten)]
        shelf: Shelf,
        /// The prompt (byte-level tokens).
        #[arg(long, conflicts_with = "prompt_file")]
        prompt: Option<String>,
        /// Read the prompt from a file.
        #[arg(long)]
        prompt_file: Option<PathBuf>,
        /// Tokens to generate.
        #[arg(long, default_value_t = 16)]
        max_new_tokens: usize,
        /// Never call the sidecar: recompute everything.
        #[arg(long)]
        no_cache: bool,
        /// Write the logits of every generated position here (raw little-endian f32).
        #[arg(long)]
        logits_out: Option<PathBuf>,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// Test hook: delete prompt block N between lookup and fetch.
        #[arg(long, hide = true)]
        delete_after_lookup: Option<usize>,
    },
    /// Time to first token with the shelf against full recompute.
    Bench {
        #[command(flatten)]
        shelf: Shelf,
        /// Shared prefix lengths, tokens.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "16,32,64,128,256,512,2048,8192"
        )]
        prefixes: Vec<usize>,
        /// Distinct suffix after the shared prefix, tokens.
        #[arg(long, default_value_t = 16)]
        suffix: usize,
        /// Repetitions per measurement (median reported); prefixes over 4096 run once.
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Print the sidecar namespaces (TOML) this worker's model needs.
    Namespaces,
}

fn worker(shelf: &Shelf) -> anyhow::Result<Worker> {
    let dtype: Dtype = shelf.dtype.parse()?;
    anyhow::ensure!(
        worker::kv::supported(dtype),
        "--dtype must be f32 or bf16, not {dtype}"
    );
    let mut ns = worker::namespace(dtype);
    if let Some(label) = &shelf.namespace {
        ns.label = label.clone();
    }
    let client = Client::new(ClientConfig {
        url: shelf.sidecar.clone(),
        protocol: if shelf.grpc {
            Protocol::Grpc
        } else {
            Protocol::Http
        },
        token: shelf.token.clone(),
        ..Default::default()
    })?;
    Ok(Worker::new(Model::new(ModelConfig::DEFAULT), client, ns))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run {
            shelf,
            prompt,
            prompt_file,
            max_new_tokens,
            no_cache,
            logits_out,
            json,
            delete_after_lookup,
        } => {
            let text = match (prompt, prompt_file) {
                (Some(p), _) => p,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .with_context(|| format!("reading {}", f.display()))?,
                (None, None) => anyhow::bail!("give --prompt or --prompt-file"),
            };
            anyhow::ensure!(!text.is_empty(), "empty prompt");
            let w = worker(&shelf)?;
            let r = w
                .generate(
                    &worker::tokenize(&text),
                    &RunOptions {
                        max_new_tokens,
                        use_cache: !no_cache,
                        await_put: true,
                        delete_after_lookup,
                    },
                )
                .await;
            if let Some(path) = logits_out {
                std::fs::write(&path, r.logits_bytes())
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "namespace {} ({}): prompt {} tokens, {} full blocks",
                    r.namespace, r.dtype, r.prompt_tokens, r.prompt_blocks
                );
                println!(
                    "shelf: lookup promised {} blocks, fetched {} ({} hit tokens), computed {} \
                     tokens, put {} blocks {:?}",
                    r.lookup_blocks,
                    r.fetched_blocks,
                    r.hit_tokens,
                    r.computed_tokens,
                    r.put_blocks,
                    r.put_outcomes
                );
                for e in &r.shelf_errors {
                    println!("shelf error (treated as a miss): {e}");
                }
                println!(
                    "ttft {:.1} ms (lookup {:.1}, fetch {:.1}, prefill {:.1}); decode {:.1} ms",
                    r.ttft_ms, r.lookup_ms, r.fetch_ms, r.prefill_ms, r.decode_ms
                );
                println!("tokens {:?}", r.tokens);
                println!("text {:?}", r.text);
            }
        }
        Cmd::Bench {
            shelf,
            prefixes,
            suffix,
            reps,
        } => {
            let w = worker(&shelf)?;
            let opts = bench::BenchOptions {
                prefixes,
                suffix,
                reps,
                ..Default::default()
            };
            let rows = bench::run(&w, &opts, |line| eprintln!("{line}")).await?;
            println!("{}", bench::report(&w, &opts, &rows));
        }
        Cmd::Namespaces => {
            for dtype in [Dtype::Float32, Dtype::Bfloat16] {
                let ns = worker::namespace(dtype);
                let l = &ns.layout;
                println!(
                    "[[namespaces]]\nlabel = \"{}\"\nmodel_id = \"{}\"\nmodel_revision = \"{}\"\n\
                     kv_dtype = \"{}\"\nblock_size = {}\nlayout = {{ num_layers = {}, \
                     num_kv_heads = {}, head_dim = {} }}\n",
                    ns.label,
                    ns.model_id,
                    ns.model_revision,
                    ns.kv_dtype,
                    ns.block_size,
                    l.num_layers,
                    l.num_kv_heads,
                    l.head_dim
                );
            }
        }
    }
    Ok(())
}
