//! `kvshelf._native`: the kvshelf library in a Python process.
//!
//! Thin on purpose: the hashing contract, the Redis store and the LMCache completion engine
//! are the Rust library's; this module converts arguments, releases the GIL around every
//! Redis exchange and copies payloads between the library's `Bytes` and the caller's
//! buffers. The Python package (`python/kvshelf/`) adds the friendly classes on top.
//!
//! # Layout
//!
//! | item | job |
//! |---|---|
//! | [`Namespace`], [`PrefixHasher`], [`lmcache_key_hash`], [`vllm_identity`], [`vllm_key_hash`], [`sglang_key_hash`], [`sglang_key_hashes`], [`block_key`] | the hashing contract |
//! | [`Store`] | the library's `RedisStore`, synchronous, GIL released |
//! | [`call::Pending`] | a `Store` call over caller memory run on the runtime: cancellable, and finished before its buffers go back (the async forms) |
//! | [`client::Client`] | the sidecar's API (HTTP or gRPC) through the Rust client, GIL released |
//! | [`plugin::Engine`] | submit/complete over an eventfd: LMCache's `native_plugin` protocol, and vLLM's secondary tier (`kvshelf.vllm`) |

use std::sync::OnceLock;
use std::time::Duration;

use kvshelf::{BlockHash, Error, PutResult, RedisStore, StoreConfig};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};

mod call;
mod client;
mod plugin;

pyo3::create_exception!(
    _native,
    KvshelfError,
    PyException,
    "A kvshelf failure that is not the caller's input: `code` says which (for example \
     `backend_unavailable`, `backend_timeout`)."
);

/// The one tokio runtime of the process: every store and plugin shares its threads.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        let threads = std::env::var("KVSHELF_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("kvshelf")
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// A `KvshelfError` whose `code` attribute is `code`.
pub(crate) fn kvshelf_error(message: String, code: &str) -> PyErr {
    let err = KvshelfError::new_err((message, code.to_owned()));
    Python::attach(|py| {
        let _ = err.value(py).setattr("code", code);
    });
    err
}

/// Library errors as Python exceptions: the caller's input → `ValueError`, anything else →
/// `KvshelfError` with the library's stable code.
pub(crate) fn to_py(e: Error) -> PyErr {
    if e.is_caller_error() {
        PyValueError::new_err(e.to_string())
    } else {
        kvshelf_error(e.to_string(), e.code())
    }
}

/// Runs `work` on the runtime with the GIL released, in the calling thread.
fn block_on<T: Send>(
    py: Python<'_>,
    work: impl Future<Output = Result<T, Error>> + Send,
) -> PyResult<T> {
    py.detach(|| runtime().block_on(work)).map_err(to_py)
}

/// A per-call deadline from seconds (`None`: none but the store's own timeouts).
pub(crate) fn deadline_of(secs: Option<f64>) -> PyResult<Option<Duration>> {
    secs.map(|s| {
        Duration::try_from_secs_f64(s)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| PyValueError::new_err("timeout must be > 0 seconds"))
    })
    .transpose()
}

/// `work`, cut off at `deadline`: past it the future is dropped (so nothing it borrowed is
/// touched any more) and the call fails with `backend_timeout`.
async fn within<T>(
    deadline: Option<Duration>,
    work: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match deadline {
        None => work.await,
        Some(d) => tokio::time::timeout(d, work)
            .await
            .unwrap_or(Err(Error::Deadline(d))),
    }
}

/// A block hash from 32 bytes or 64 hex digits.
pub(crate) fn hash_of(obj: &Bound<'_, PyAny>) -> PyResult<BlockHash> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        let bytes = b.as_bytes();
        let arr: [u8; 32] = bytes.try_into().map_err(|_| {
            PyValueError::new_err(format!("a block hash is 32 bytes, got {}", bytes.len()))
        })?;
        return Ok(BlockHash(arr));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return s.to_str()?.parse().map_err(to_py);
    }
    Err(PyValueError::new_err(
        "a block hash is 32 bytes or 64 hex digits",
    ))
}

pub(crate) fn hashes_of(objs: &Bound<'_, PyAny>) -> PyResult<Vec<BlockHash>> {
    objs.try_iter()?.map(|o| hash_of(&o?)).collect()
}

/// A buffer the caller owns, as contiguous bytes: anything with the buffer protocol
/// (`bytearray`, `memoryview`, a numpy array, LMCache's `byte_array`). Buffers whose item
/// format is not bytes (a float32 array) are viewed as bytes first.
pub(crate) fn byte_buffer(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<PyBuffer<u8>> {
    let buf = match PyBuffer::<u8>::get(obj) {
        Ok(b) => b,
        Err(_) => {
            let view = obj
                .py()
                .import("builtins")?
                .getattr("memoryview")?
                .call1((obj,))?;
            PyBuffer::<u8>::get(&view.call_method1("cast", ("B",))?)?
        }
    };
    if !buf.is_c_contiguous() {
        return Err(PyValueError::new_err("buffers must be C-contiguous"));
    }
    if writable && buf.readonly() {
        return Err(PyValueError::new_err(
            "reads need a writable buffer (bytearray, numpy array, memoryview of one)",
        ));
    }
    Ok(buf)
}

/// What [`hashes_and_buffers`] gives: the hashes, the buffers, where their bytes are.
pub(crate) type HashesAndBuffers = (Vec<BlockHash>, Vec<PyBuffer<u8>>, Vec<RawBuf>);

/// The block hashes of a call and the caller's buffers for them, one each: the buffers
/// (kept, so they stay alive and exported while the call runs without the GIL) and where
/// their bytes are. A count mismatch or an unusable buffer raises `ValueError`.
pub(crate) fn hashes_and_buffers(
    hashes: &Bound<'_, PyAny>,
    buffers: &[Bound<'_, PyAny>],
    writable: bool,
) -> PyResult<HashesAndBuffers> {
    let hashes = hashes_of(hashes)?;
    if hashes.len() != buffers.len() {
        return Err(PyValueError::new_err(format!(
            "{} hashes but {} buffers",
            hashes.len(),
            buffers.len()
        )));
    }
    let bufs: Vec<PyBuffer<u8>> = buffers
        .iter()
        .map(|b| byte_buffer(b, writable))
        .collect::<PyResult<_>>()?;
    let raws = bufs.iter().map(RawBuf::of).collect();
    Ok((hashes, bufs, raws))
}

/// Where a buffer's bytes are, for code that runs without the GIL. The `PyBuffer` it came
/// from must outlive every use.
#[derive(Clone, Copy)]
pub(crate) struct RawBuf {
    pub ptr: usize,
    pub len: usize,
}

impl RawBuf {
    pub fn of(buf: &PyBuffer<u8>) -> RawBuf {
        RawBuf {
            ptr: buf.buf_ptr() as usize,
            len: buf.len_bytes(),
        }
    }

    /// # Safety
    /// The buffer is alive, writable and not read or written by anyone else meanwhile.
    pub unsafe fn fill(&self, src: &[u8]) {
        debug_assert!(src.len() <= self.len);
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr as *mut u8, src.len()) }
    }

    /// # Safety
    /// The buffer is alive, writable and not read or written by anyone else meanwhile.
    pub unsafe fn as_mut_slice<'a>(&self) -> &'a mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u8, self.len) }
    }

    /// # Safety
    /// The buffer is alive and not written by anyone else meanwhile.
    pub unsafe fn as_slice<'a>(&self) -> &'a [u8] {
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

/// A caller's buffer lent to the library as `Bytes`, without a copy, for a write.
struct Lent(RawBuf);

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: see `lend`.
        unsafe { self.0.as_slice() }
    }
}

/// The bytes of `raw` as `Bytes` that point at the caller's memory (dropping them frees
/// nothing).
///
/// # Safety
/// The buffer must stay alive and unmodified until every clone of the returned `Bytes` is
/// dropped. The library's writes keep a value only inside the call's own future (its RESP
/// path writes the value, vectored, from that future and keeps no copy), so holding the
/// `PyBuffer` until that future has ended — returned, timed out or been aborted and
/// awaited — is enough. Were the library ever to keep a value past the call (a queue, a
/// cache), this must become a copy.
pub(crate) unsafe fn lend(raw: RawBuf) -> bytes::Bytes {
    bytes::Bytes::from_owner(Lent(raw))
}

/// Converts Python values to the JSON the library's serde configs read: durations may be
/// numbers of seconds as well as humane strings (`"5s"`, `"1h"`).
fn json_of(obj: &Bound<'_, PyAny>, duration_keys: &[&str]) -> PyResult<serde_json::Value> {
    let text: String = obj
        .py()
        .import("json")?
        .call_method1("dumps", (obj,))?
        .extract()?;
    let mut v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| PyValueError::new_err(e.to_string()))?;
    if let Some(map) = v.as_object_mut() {
        for k in duration_keys {
            if let Some(secs) = map.get(*k).and_then(serde_json::Value::as_f64) {
                map.insert((*k).into(), format!("{}ms", (secs * 1000.0).round()).into());
            }
        }
    }
    Ok(v)
}

/// What must match for KV to be reusable, and how its blocks are hashed.
///
/// `Namespace(label=..., model_id=..., kv_dtype=..., num_layers=..., num_kv_heads=...,
/// head_dim=..., block_size=16, tp_size=1, tp_rank=0, order="lkthd", model_revision="",
/// lora_adapter=None, ttl=None, hash_scheme="kvshelf-v1")`; the layout fields may also be
/// nested under `layout=` as in the sidecar's configuration.
#[pyclass(frozen, module = "kvshelf._native")]
#[derive(Clone)]
pub struct Namespace(pub(crate) kvshelf::Namespace);

#[pymethods]
impl Namespace {
    #[new]
    #[pyo3(signature = (**fields))]
    fn new(fields: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let Some(fields) = fields else {
            return Err(PyValueError::new_err("a namespace needs its fields"));
        };
        let mut v = json_of(fields.as_any(), &["ttl"])?;
        let map = v.as_object_mut().expect("kwargs are a dict");
        if !map.contains_key("layout") {
            let mut layout = serde_json::Map::new();
            for k in [
                "num_layers",
                "num_kv_heads",
                "head_dim",
                "tp_size",
                "tp_rank",
                "order",
            ] {
                if let Some(x) = map.remove(k) {
                    layout.insert(k.into(), x);
                }
            }
            map.insert("layout".into(), layout.into());
        }
        let ns: kvshelf::Namespace =
            serde_json::from_value(v).map_err(|e| PyValueError::new_err(e.to_string()))?;
        ns.validate().map_err(to_py)?;
        Ok(Namespace(ns))
    }

    /// The namespace as JSON, in the sidecar configuration's shape.
    fn to_json(&self) -> String {
        serde_json::to_string(&self.0).expect("a namespace serialises")
    }

    /// The readable label in Redis keys.
    #[getter]
    fn label(&self) -> &str {
        &self.0.label
    }

    /// Tokens per block.
    #[getter]
    fn block_size(&self) -> u32 {
        self.0.block_size
    }

    /// Bytes of one full block (the largest chunk for a foreign hash scheme).
    #[getter]
    fn block_bytes(&self) -> u64 {
        self.0.block_bytes()
    }

    /// Shape of one full block, axes in the layout's order.
    #[getter]
    fn block_shape(&self) -> Vec<u64> {
        self.0.block_shape()
    }

    /// `kvshelf-v1` or a foreign scheme such as `lmcache`.
    #[getter]
    fn hash_scheme(&self) -> &'static str {
        self.0.hash_scheme.name()
    }

    fn __repr__(&self) -> String {
        format!("Namespace({})", self.to_json())
    }
}

/// Hashes token prefixes of one namespace and tenant salt (`docs/hashing.md`).
#[pyclass(frozen, module = "kvshelf._native")]
pub struct PrefixHasher(kvshelf::PrefixHasher);

#[pymethods]
impl PrefixHasher {
    #[new]
    #[pyo3(signature = (namespace, salt=None))]
    fn new(namespace: &Namespace, salt: Option<&[u8]>) -> Self {
        PrefixHasher(kvshelf::PrefixHasher::new(&namespace.0, salt))
    }

    /// The namespace root (the parent of block 0), 32 bytes.
    #[getter]
    fn root<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.root().0)
    }

    /// Tokens per block.
    #[getter]
    fn block_size(&self) -> u32 {
        self.0.block_size()
    }

    /// The hash of every full block of `tokens` (32 bytes each); a partial last block is
    /// not hashed. `extra_keys[i]` are block i's extra keys (multimodal hashes).
    #[pyo3(signature = (tokens, extra_keys=None))]
    fn hash_prefix<'py>(
        &self,
        py: Python<'py>,
        tokens: Vec<u32>,
        extra_keys: Option<Vec<Vec<Vec<u8>>>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let hashes = match extra_keys {
            None => self.0.hash_prefix(&tokens),
            Some(extras) => self
                .0
                .hash_prefix_with_extras(&tokens, &extras)
                .map_err(to_py)?,
        };
        PyList::new(py, hashes.iter().map(|h| PyBytes::new(py, &h.0)))
    }
}

/// The block hash under which kvshelf stores the LMCache chunk whose key is `key`
/// (`docs/hashing.md` §8), 32 bytes.
#[pyfunction]
fn lmcache_key_hash<'py>(py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyBytes>> {
    let h = kvshelf::hashing::lmcache_key_hash(key).map_err(to_py)?;
    Ok(PyBytes::new(py, &h.0))
}

/// The identity digest of a vLLM instance (`docs/hashing.md` §9), 32 bytes: what must
/// match for two instances to share offloaded chunks.
#[pyfunction]
#[pyo3(signature = (*, model, kv_dtype, tokens_per_hash, blocks_per_chunk, chunk_bytes,
                    tp_size=1, pp_size=1, pcp_size=1, dcp_size=1, rank=0, extra=String::new()))]
#[allow(clippy::too_many_arguments)]
fn vllm_identity<'py>(
    py: Python<'py>,
    model: String,
    kv_dtype: String,
    tokens_per_hash: u32,
    blocks_per_chunk: u32,
    chunk_bytes: u64,
    tp_size: u32,
    pp_size: u32,
    pcp_size: u32,
    dcp_size: u32,
    rank: u32,
    extra: String,
) -> PyResult<Bound<'py, PyBytes>> {
    let id = kvshelf::hashing::VllmIdentity {
        model,
        kv_dtype,
        tokens_per_hash,
        blocks_per_chunk,
        chunk_bytes,
        tp_size,
        pp_size,
        pcp_size,
        dcp_size,
        rank,
        extra,
    };
    Ok(PyBytes::new(py, &id.digest().map_err(to_py)?))
}

/// The block hash under which kvshelf stores the vLLM chunk whose offload key is `key`
/// (block hash and 4-byte group index), for the instance whose `vllm_identity` is
/// `identity` (`docs/hashing.md` §9), 32 bytes.
#[pyfunction]
fn vllm_key_hash<'py>(
    py: Python<'py>,
    identity: &[u8],
    key: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    let identity: &[u8; 32] = identity
        .try_into()
        .map_err(|_| PyValueError::new_err("a vLLM identity is 32 bytes"))?;
    let h = kvshelf::hashing::vllm_key_hash(identity, key).map_err(to_py)?;
    Ok(PyBytes::new(py, &h.0))
}

/// The block hash under which kvshelf stores part `part` of the SGLang HiCache page `key`
/// of the instance whose storage identity is `identity` (`docs/hashing.md` §10), 32 bytes.
#[pyfunction]
#[pyo3(signature = (identity, key, part=0))]
fn sglang_key_hash<'py>(
    py: Python<'py>,
    identity: &str,
    key: &str,
    part: u32,
) -> PyResult<Bound<'py, PyBytes>> {
    let h = kvshelf::hashing::sglang_key_hash(identity, key, part).map_err(to_py)?;
    Ok(PyBytes::new(py, &h.0))
}

/// `sglang_key_hash(identity, key, part)` for every key and every part `0..parts`,
/// page-major (all parts of `keys[0]`, then of `keys[1]`, …), in one call.
#[pyfunction]
fn sglang_key_hashes<'py>(
    py: Python<'py>,
    identity: &str,
    keys: Vec<String>,
    parts: u32,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let hasher = kvshelf::hashing::SglangKeyHasher::new(identity).map_err(to_py)?;
    let mut out = Vec::with_capacity(keys.len() * parts as usize);
    for key in &keys {
        for part in 0..parts {
            let h = hasher.hash(key, part).map_err(to_py)?;
            out.push(PyBytes::new(py, &h.0));
        }
    }
    Ok(out)
}

/// The Redis key of a block: `kvshelf:v1:<label>:<64 hex digits>`.
#[pyfunction]
fn block_key(label: &str, hash: &Bound<'_, PyAny>) -> PyResult<String> {
    kvshelf::namespace::validate_label(label).map_err(to_py)?;
    Ok(kvshelf::store::block_key(label, &hash_of(hash)?))
}

pub(crate) fn store_config(
    url: &str,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<StoreConfig> {
    let mut v = match options {
        Some(o) => json_of(
            o.as_any(),
            &["ttl", "response_timeout", "connection_timeout"],
        )?,
        None => serde_json::json!({}),
    };
    v.as_object_mut()
        .expect("kwargs are a dict")
        .insert("url".into(), url.into());
    serde_json::from_value(v).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// The kvshelf library's Redis store, in this process. Every method releases the GIL
/// while it talks to Redis.
#[pyclass(frozen, module = "kvshelf._native")]
pub struct Store {
    store: RedisStore,
}

fn outcome_name(o: PutResult) -> &'static str {
    match o {
        PutResult::Stored => "stored",
        PutResult::AlreadyPresent => "already_present",
        // The store never queues: `Dropped` is a block whose Redis node did not answer.
        PutResult::Dropped | PutResult::Queued => "unavailable",
    }
}

/// The hashes and buffers of a read, checked: a kvshelf block is exactly `block_bytes`,
/// so a smaller buffer is refused before anything is read (a foreign-scheme chunk may be
/// shorter; the read then says).
fn read_args(
    ns: &Namespace,
    hashes: &Bound<'_, PyAny>,
    buffers: &[Bound<'_, PyAny>],
) -> PyResult<HashesAndBuffers> {
    let args = hashes_and_buffers(hashes, buffers, true)?;
    if ns.0.hash_scheme.is_kvshelf() {
        let want = ns.0.block_bytes();
        if let Some((i, raw)) = args
            .2
            .iter()
            .enumerate()
            .find(|(_, r)| (r.len as u64) < want)
        {
            return Err(PyValueError::new_err(format!(
                "buffer {i} holds {} bytes; its block has {want}",
                raw.len
            )));
        }
    }
    Ok(args)
}

/// Reads blocks straight from the socket into `raws`; per block the bytes written, `None`
/// for a miss.
///
/// # Safety
/// Every buffer is alive, writable and touched by nobody else until the returned future
/// has ended (completed, or dropped). Buffers that overlap only make their bytes
/// unspecified.
pub(crate) async unsafe fn read_into(
    store: &RedisStore,
    ns: &kvshelf::Namespace,
    hashes: &[BlockHash],
    raws: &[RawBuf],
) -> Result<Vec<Option<usize>>, Error> {
    // SAFETY: the caller's promise above.
    let mut slices: Vec<&mut [u8]> = raws.iter().map(|r| unsafe { r.as_mut_slice() }).collect();
    let found = store.read_into(ns, hashes, &mut slices).await?;
    Ok(found
        .into_iter()
        .map(|r| match r {
            kvshelf::ReadInto::Hit { len, .. } => Some(len),
            _ => None,
        })
        .collect())
}

/// Puts blocks whose payloads are the caller's memory, without a copy.
///
/// # Safety
/// Every buffer is alive and unmodified until the returned future has ended.
pub(crate) async unsafe fn put_from(
    store: &RedisStore,
    ns: &kvshelf::Namespace,
    hashes: &[BlockHash],
    raws: &[RawBuf],
) -> Result<Vec<&'static str>, Error> {
    // SAFETY: the `Bytes` live inside this future; the caller's promise above.
    let blocks: Vec<(BlockHash, bytes::Bytes)> = hashes
        .iter()
        .zip(raws)
        .map(|(h, r)| (*h, unsafe { lend(*r) }))
        .collect();
    let outcomes = store.put(ns, &blocks).await?;
    Ok(outcomes.into_iter().map(outcome_name).collect())
}

#[pymethods]
impl Store {
    /// `Store(url="redis://127.0.0.1:6379", **options)`: `options` are the fields of the
    /// library's `StoreConfig` (`ttl`, `sliding_ttl`, `response_timeout`, `cluster`, …);
    /// durations in seconds or as `"5s"`. Connects lazily.
    #[new]
    #[pyo3(signature = (url="redis://127.0.0.1:6379", **options))]
    fn new(url: &str, options: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let cfg = store_config(url, options)?;
        let _rt = runtime().enter();
        Ok(Store {
            store: RedisStore::new(cfg).map_err(to_py)?,
        })
    }

    /// Checks that Redis answers.
    fn ping(&self, py: Python<'_>) -> PyResult<()> {
        block_on(py, self.store.ping())
    }

    /// How many leading blocks of `hashes` are on the shelf (one round trip).
    fn lookup(&self, py: Python<'_>, ns: &Namespace, hashes: &Bound<'_, PyAny>) -> PyResult<usize> {
        let hashes = hashes_of(hashes)?;
        block_on(py, self.store.lookup(&ns.0, &hashes))
    }

    /// Whether each block of `hashes` is on the shelf (one round trip).
    fn exists(
        &self,
        py: Python<'_>,
        ns: &Namespace,
        hashes: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<bool>> {
        let hashes = hashes_of(hashes)?;
        block_on(py, self.store.exists(&ns.0.label, &hashes))
    }

    /// Reads blocks into the caller's buffers, `buffers[i]` for `hashes[i]`, with the GIL
    /// released. Returns, per block, the number of bytes written, or `None` for a miss
    /// (absent, or found corrupt and deleted). A buffer smaller than its block raises
    /// `ValueError` before any buffer is written.
    ///
    /// The buffers are written only while this call runs. `timeout` (seconds) bounds the
    /// whole call: past it the read is dropped and `KvshelfError` (`backend_timeout`) is
    /// raised, so a thread running it always returns by then. A caller that stops waiting
    /// for this call on another thread must not reuse the buffers before it has returned:
    /// `start_get_into` is the form that can be cancelled.
    #[pyo3(signature = (ns, hashes, buffers, timeout=None))]
    fn get_into(
        &self,
        py: Python<'_>,
        ns: &Namespace,
        hashes: &Bound<'_, PyAny>,
        buffers: Vec<Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<Vec<Option<usize>>> {
        let deadline = deadline_of(timeout)?;
        let (hashes, bufs, raws) = read_args(ns, hashes, &buffers)?;
        // SAFETY: `bufs` keeps every buffer alive and exported (so not resizable) until
        // this call returns, which is after the read has ended; checked writable above.
        let written = block_on(
            py,
            within(deadline, unsafe {
                read_into(&self.store, &ns.0, &hashes, &raws)
            }),
        )?;
        drop(bufs);
        Ok(written)
    }

    /// `get_into` started on kvshelf's threads: returns a `Pending` at once, whose `wait()`
    /// gives `get_into`'s result and whose `cancel()` stops the read. The buffers (and
    /// `keep`, the object that owns their memory, if any) are held until the read has
    /// ended; `wait()` returns only then, cancelled or not.
    #[pyo3(signature = (ns, hashes, buffers, timeout=None, keep=None))]
    fn start_get_into(
        &self,
        ns: &Namespace,
        hashes: &Bound<'_, PyAny>,
        buffers: Vec<Bound<'_, PyAny>>,
        timeout: Option<f64>,
        keep: Option<Py<PyAny>>,
    ) -> PyResult<call::Pending> {
        let deadline = deadline_of(timeout)?;
        let (hashes, bufs, raws) = read_args(ns, hashes, &buffers)?;
        let (store, ns) = (self.store.clone(), ns.0.clone());
        let work = async move {
            // SAFETY: the `Pending` holds the buffers until this future has ended.
            let written = within(deadline, unsafe { read_into(&store, &ns, &hashes, &raws) });
            written
                .await
                .map(call::Answer::Read)
                .map_err(call::Failure::Store)
        };
        Ok(call::Pending::spawn(work, bufs, keep))
    }

    /// Reads blocks into new `bytes` objects (`None` for a miss). `get_into` avoids the
    /// allocation.
    fn get<'py>(
        &self,
        py: Python<'py>,
        ns: &Namespace,
        hashes: &Bound<'py, PyAny>,
    ) -> PyResult<Vec<Option<Bound<'py, PyBytes>>>> {
        let hashes = hashes_of(hashes)?;
        let hits = block_on(py, self.store.get(&ns.0, &hashes))?;
        Ok(hits
            .into_iter()
            .map(|h| h.map(|h| PyBytes::new(py, &h.block.payload)))
            .collect())
    }

    /// Puts blocks from the caller's buffers, write-once with the namespace's TTL. Returns
    /// per block `"stored"`, `"already_present"` or `"unavailable"` (cluster node down).
    /// A payload of the wrong length raises `ValueError` and writes nothing. The buffers
    /// are read only while this call runs; `timeout` as for `get_into`.
    #[pyo3(signature = (ns, hashes, buffers, timeout=None))]
    fn put(
        &self,
        py: Python<'_>,
        ns: &Namespace,
        hashes: &Bound<'_, PyAny>,
        buffers: Vec<Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<Vec<&'static str>> {
        let deadline = deadline_of(timeout)?;
        let (hashes, bufs, raws) = hashes_and_buffers(hashes, &buffers, false)?;
        // SAFETY: `bufs` keeps the buffers alive until this call returns, after the put.
        let outcomes = block_on(
            py,
            within(deadline, unsafe {
                put_from(&self.store, &ns.0, &hashes, &raws)
            }),
        )?;
        drop(bufs);
        Ok(outcomes)
    }

    /// `put` started on kvshelf's threads, as `start_get_into` is `get_into`'s: the
    /// buffers (and `keep`) are held, and read, until the put has ended.
    #[pyo3(signature = (ns, hashes, buffers, timeout=None, keep=None))]
    fn start_put(
        &self,
        ns: &Namespace,
        hashes: &Bound<'_, PyAny>,
        buffers: Vec<Bound<'_, PyAny>>,
        timeout: Option<f64>,
        keep: Option<Py<PyAny>>,
    ) -> PyResult<call::Pending> {
        let deadline = deadline_of(timeout)?;
        let (hashes, bufs, raws) = hashes_and_buffers(hashes, &buffers, false)?;
        let (store, ns) = (self.store.clone(), ns.0.clone());
        let work = async move {
            // SAFETY: the `Pending` holds the buffers until this future has ended.
            let stored = within(deadline, unsafe { put_from(&store, &ns, &hashes, &raws) });
            stored
                .await
                .map(call::Answer::Put)
                .map_err(call::Failure::Store)
        };
        Ok(call::Pending::spawn(work, bufs, keep))
    }

    /// Deletes blocks; returns how many existed.
    fn delete(&self, py: Python<'_>, ns: &Namespace, hashes: &Bound<'_, PyAny>) -> PyResult<u64> {
        let hashes = hashes_of(hashes)?;
        block_on(py, self.store.delete(&ns.0.label, &hashes))
    }

    /// Remaining time to live of a block in seconds: `None` when it is missing, `inf` when
    /// it is pinned.
    fn ttl(
        &self,
        py: Python<'_>,
        ns: &Namespace,
        hash: &Bound<'_, PyAny>,
    ) -> PyResult<Option<f64>> {
        let hash = hash_of(hash)?;
        let t = block_on(py, self.store.ttl(&ns.0.label, &hash))?;
        Ok(t.map(|t| t.map_or(f64::INFINITY, |d: Duration| d.as_secs_f64())))
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Namespace>()?;
    m.add_class::<PrefixHasher>()?;
    m.add_class::<Store>()?;
    m.add_class::<call::Pending>()?;
    m.add_class::<client::Client>()?;
    m.add_class::<plugin::Engine>()?;
    m.add_function(wrap_pyfunction!(lmcache_key_hash, m)?)?;
    m.add_function(wrap_pyfunction!(vllm_identity, m)?)?;
    m.add_function(wrap_pyfunction!(vllm_key_hash, m)?)?;
    m.add_function(wrap_pyfunction!(sglang_key_hash, m)?)?;
    m.add_function(wrap_pyfunction!(sglang_key_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(block_key, m)?)?;
    m.add("KvshelfError", m.py().get_type::<KvshelfError>())?;
    Ok(())
}
