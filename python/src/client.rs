//! `Client`: the sidecar's API from Python, through the Rust client (HTTP or gRPC), with
//! the GIL released for every call.

use std::time::Duration;

use kvshelf::BlockHash;
use kvshelf::client::{ClientConfig, ClientError, Protocol};
use kvshelf::frame::EndReason;
use kvshelf::store::PutResult;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::call::{Answer, Failure, Pending};
use crate::{RawBuf, hash_of, hashes_and_buffers, hashes_of, kvshelf_error, runtime};

/// The sidecar's errors as Python exceptions: its refusals and transport failures raise
/// `KvshelfError` with `code` (the API's stable code, or `transport` / `protocol`); a
/// client configuration that cannot work raises `ValueError`.
pub(crate) fn to_py(e: ClientError) -> PyErr {
    let code = match &e {
        ClientError::Api { code, .. } => code.clone(),
        ClientError::Transport(_) => "transport".to_owned(),
        ClientError::Protocol(_) => "protocol".to_owned(),
        ClientError::Config(m) => return PyValueError::new_err(m.clone()),
        _ => "client".to_owned(),
    };
    kvshelf_error(e.to_string(), &code)
}

/// Fetches the leading run of `hashes` and copies it into `raws`: `(blocks written,
/// reason)`. Every payload is checked to fit before any buffer is written, and the copy
/// happens inside this future, after its last await: a future dropped early wrote nothing.
///
/// # Safety
/// Every buffer is alive, writable and touched by nobody else until the returned future
/// has ended.
async unsafe fn fetch_into(
    client: &kvshelf::client::Client,
    namespace: &str,
    hashes: &[BlockHash],
    raws: &[RawBuf],
) -> Result<(usize, &'static str), Failure> {
    let fetched = client
        .fetch(namespace, hashes)
        .await
        .map_err(Failure::Client)?;
    for (i, ((_, payload), raw)) in fetched.blocks.iter().zip(raws).enumerate() {
        if payload.len() > raw.len {
            return Err(Failure::Input(format!(
                "buffer {i} holds {} bytes; its block has {}",
                raw.len,
                payload.len()
            )));
        }
    }
    for ((_, payload), raw) in fetched.blocks.iter().zip(raws) {
        // SAFETY: the caller's promise above; checked large enough above.
        unsafe { raw.fill(payload) };
    }
    Ok((fetched.blocks.len(), reason_name(fetched.reason)))
}

fn reason_name(r: EndReason) -> &'static str {
    match r {
        EndReason::Complete => "complete",
        EndReason::Miss => "miss",
        EndReason::BackendUnavailable => "backend_unavailable",
        _ => "unknown",
    }
}

/// The blocks of a put, their payloads copied out of the caller's buffers (under the GIL,
/// before the call goes anywhere).
fn copied_blocks(
    py: Python<'_>,
    hashes: &Bound<'_, PyAny>,
    buffers: &[Bound<'_, PyAny>],
) -> PyResult<Vec<(BlockHash, bytes::Bytes)>> {
    let (hashes, bufs, _) = hashes_and_buffers(hashes, buffers, false)?;
    hashes
        .iter()
        .zip(&bufs)
        .map(|(h, buf)| Ok((*h, bytes::Bytes::from(buf.to_vec(py)?))))
        .collect()
}

fn put_name(r: &PutResult) -> &'static str {
    match r {
        PutResult::Stored => "stored",
        PutResult::AlreadyPresent => "already_present",
        PutResult::Queued => "queued",
        PutResult::Dropped => "dropped",
    }
}

/// A client of a kvshelf sidecar (`docs/api.md`). Thread-safe; share one per process.
#[pyclass(frozen, module = "kvshelf._native")]
pub struct Client {
    client: kvshelf::client::Client,
}

#[pymethods]
impl Client {
    /// `Client(url="http://127.0.0.1:7070", protocol="http", token=None, timeout=30.0,
    /// connect_timeout=1.0)`: `protocol` is `"http"` or `"grpc"`; `url` may be
    /// `unix:<path>` for a sidecar's Unix socket; timeouts in seconds.
    #[new]
    #[pyo3(signature = (url="http://127.0.0.1:7070", protocol="http", token=None, timeout=30.0, connect_timeout=1.0))]
    fn new(
        url: &str,
        protocol: &str,
        token: Option<String>,
        timeout: f64,
        connect_timeout: f64,
    ) -> PyResult<Self> {
        let protocol = match protocol {
            "http" => Protocol::Http,
            "grpc" => Protocol::Grpc,
            other => {
                return Err(PyValueError::new_err(format!(
                    "protocol is \"http\" or \"grpc\", not {other:?}"
                )));
            }
        };
        let secs = |s: f64, what: &str| {
            Duration::try_from_secs_f64(s)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| PyValueError::new_err(format!("{what} must be > 0 seconds")))
        };
        let cfg = ClientConfig {
            url: url.to_owned(),
            protocol,
            token,
            timeout: secs(timeout, "timeout")?,
            connect_timeout: secs(connect_timeout, "connect_timeout")?,
        };
        let _rt = runtime().enter();
        Ok(Client {
            client: kvshelf::client::Client::new(cfg).map_err(to_py)?,
        })
    }

    /// Block hashes (32 bytes each) of every full block of `tokens`, with this token's
    /// tenant salt.
    fn hash<'py>(
        &self,
        py: Python<'py>,
        namespace: &str,
        tokens: Vec<u32>,
    ) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let hashes = py
            .detach(|| runtime().block_on(self.client.hash(namespace, &tokens)))
            .map_err(to_py)?;
        Ok(hashes.iter().map(|h| PyBytes::new(py, &h.0)).collect())
    }

    /// How many leading blocks are on the shelf, for `tokens` (hashed by the sidecar) or
    /// `block_hashes`. Returns a dict: `hit_blocks`, `hit_tokens`, `block_hashes` (bytes),
    /// `backend_ok` (false: the backend did not answer in time, the answer is a miss).
    /// `warm=True` also reads the hits into the sidecar's L1.
    #[pyo3(signature = (namespace, tokens=None, block_hashes=None, warm=false))]
    fn lookup<'py>(
        &self,
        py: Python<'py>,
        namespace: &str,
        tokens: Option<Vec<u32>>,
        block_hashes: Option<&Bound<'py, PyAny>>,
        warm: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let hashes = block_hashes.map(hashes_of).transpose()?;
        let found = py
            .detach(|| {
                runtime().block_on(async {
                    match (&tokens, &hashes) {
                        (Some(t), None) => self.client.lookup_tokens(namespace, t, warm).await,
                        (None, Some(h)) => self.client.lookup_hashes(namespace, h, warm).await,
                        _ => Err(ClientError::Config(
                            "give exactly one of tokens and block_hashes".into(),
                        )),
                    }
                })
            })
            .map_err(to_py)?;
        let d = PyDict::new(py);
        d.set_item("hit_blocks", found.hit_blocks)?;
        d.set_item("hit_tokens", found.hit_tokens)?;
        let hs: Vec<Bound<'py, PyBytes>> = found
            .block_hashes
            .iter()
            .map(|h| PyBytes::new(py, &h.0))
            .collect();
        d.set_item("block_hashes", hs)?;
        d.set_item("backend_ok", found.backend_ok)?;
        Ok(d)
    }

    /// Fetches the leading run of `hashes` into `buffers` (`buffers[i]` for `hashes[i]`,
    /// each writable and at least one block long), with the GIL released. Returns
    /// `(n, reason)`: the first `n` buffers were written; `reason` is `"complete"`,
    /// `"miss"` or `"backend_unavailable"` (recompute from block `n` on). The buffers are
    /// written only while this call runs (`start_fetch_into` can be cancelled).
    fn fetch_into(
        &self,
        py: Python<'_>,
        namespace: &str,
        hashes: &Bound<'_, PyAny>,
        buffers: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<(usize, &'static str)> {
        let (hashes, bufs, raws) = hashes_and_buffers(hashes, &buffers, true)?;
        // SAFETY: `bufs` keeps every buffer alive and exported until this call returns,
        // after the fetch has ended; checked writable above.
        let out = py.detach(|| {
            runtime().block_on(unsafe { fetch_into(&self.client, namespace, &hashes, &raws) })
        });
        drop(bufs);
        Ok(out?)
    }

    /// `fetch_into` started on kvshelf's threads: a `Pending` whose `wait()` gives
    /// `fetch_into`'s result and whose `cancel()` stops the fetch; the buffers (and `keep`)
    /// are held until it has ended.
    #[pyo3(signature = (namespace, hashes, buffers, keep=None))]
    fn start_fetch_into(
        &self,
        namespace: &str,
        hashes: &Bound<'_, PyAny>,
        buffers: Vec<Bound<'_, PyAny>>,
        keep: Option<Py<PyAny>>,
    ) -> PyResult<Pending> {
        let (hashes, bufs, raws) = hashes_and_buffers(hashes, &buffers, true)?;
        let (client, namespace) = (self.client.clone(), namespace.to_owned());
        let work = async move {
            // SAFETY: the `Pending` holds the buffers until this future has ended.
            let fetched = unsafe { fetch_into(&client, &namespace, &hashes, &raws) };
            fetched.await.map(Answer::Fetch)
        };
        Ok(Pending::spawn(work, bufs, keep))
    }

    /// Fetches the leading run of `hashes` as new `bytes` objects: `(payloads, reason)`.
    fn fetch<'py>(
        &self,
        py: Python<'py>,
        namespace: &str,
        hashes: &Bound<'py, PyAny>,
    ) -> PyResult<(Vec<Bound<'py, PyBytes>>, &'static str)> {
        let hashes = hashes_of(hashes)?;
        let fetched = py
            .detach(|| runtime().block_on(self.client.fetch(namespace, &hashes)))
            .map_err(to_py)?;
        let blocks = fetched
            .blocks
            .iter()
            .map(|(_, p)| PyBytes::new(py, p))
            .collect();
        Ok((blocks, reason_name(fetched.reason)))
    }

    /// Puts blocks from the caller's buffers, write-once. Returns per block `"stored"`,
    /// `"already_present"`, `"queued"` (with `asynchronous=True`) or `"dropped"` (the
    /// backend failed or was late, or the queue was full: the cache failed open).
    ///
    /// The payloads are copied once before the GIL is released: the HTTP stack may still
    /// hold a request body after a call has timed out, so it never borrows the caller's
    /// memory.
    #[pyo3(signature = (namespace, hashes, buffers, asynchronous=false))]
    fn put(
        &self,
        py: Python<'_>,
        namespace: &str,
        hashes: &Bound<'_, PyAny>,
        buffers: Vec<Bound<'_, PyAny>>,
        asynchronous: bool,
    ) -> PyResult<Vec<&'static str>> {
        let blocks = copied_blocks(py, hashes, &buffers)?;
        let results = py
            .detach(|| runtime().block_on(self.client.put(namespace, &blocks, asynchronous)))
            .map_err(to_py)?;
        Ok(results.iter().map(put_name).collect())
    }

    /// `put` started on kvshelf's threads: the payloads are copied before this returns
    /// (the buffers are the caller's again at once); `wait()` gives `put`'s result and
    /// `cancel()` stops the request.
    #[pyo3(signature = (namespace, hashes, buffers, asynchronous=false))]
    fn start_put(
        &self,
        py: Python<'_>,
        namespace: &str,
        hashes: &Bound<'_, PyAny>,
        buffers: Vec<Bound<'_, PyAny>>,
        asynchronous: bool,
    ) -> PyResult<Pending> {
        let blocks = copied_blocks(py, hashes, &buffers)?;
        let (client, namespace) = (self.client.clone(), namespace.to_owned());
        let work = async move {
            let results = client.put(&namespace, &blocks, asynchronous).await;
            results
                .map(|r| Answer::Put(r.iter().map(put_name).collect()))
                .map_err(Failure::Client)
        };
        Ok(Pending::spawn(work, Vec::new(), None))
    }

    /// Deletes blocks; returns how many existed (an admin token where tokens are set).
    fn delete(&self, py: Python<'_>, namespace: &str, hashes: &Bound<'_, PyAny>) -> PyResult<u64> {
        let hashes = hashes_of(hashes)?;
        py.detach(|| runtime().block_on(self.client.delete(namespace, &hashes)))
            .map_err(to_py)
    }

    /// Pins a block (no TTL, never evicted); returns whether it exists.
    fn pin(&self, py: Python<'_>, namespace: &str, hash: &Bound<'_, PyAny>) -> PyResult<bool> {
        let hash = hash_of(hash)?;
        py.detach(|| runtime().block_on(self.client.pin(namespace, &hash, true)))
            .map_err(to_py)
    }

    /// Gives a block its namespace's TTL back; returns whether it exists.
    fn unpin(&self, py: Python<'_>, namespace: &str, hash: &Bound<'_, PyAny>) -> PyResult<bool> {
        let hash = hash_of(hash)?;
        py.detach(|| runtime().block_on(self.client.pin(namespace, &hash, false)))
            .map_err(to_py)
    }
}
