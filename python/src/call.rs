//! `Pending`: a call over caller memory (the store's, or the sidecar client's), running on
//! the runtime while the caller waits for it, and that the caller can cancel.
//!
//! Why it exists: asyncio code gives up on calls (`asyncio.wait_for`, a cancelled task,
//! LMCache's `future.result(timeout)` then `future.cancel()`) and then reuses or frees the
//! memory it lent. A synchronous call run on an executor thread cannot be stopped, so it
//! would go on writing into that memory. A `Pending` is a tokio task: `cancel` aborts it,
//! and `wait` returns only once the task has ended — completed, or its future dropped, so
//! that nothing writes into (or reads from) the caller's buffers any more (payloads are
//! read from the socket straight into the buffers inside the task's polls; between two
//! polls nothing touches them). The buffers, and the object that owns their memory
//! (`keep`), are held until then; a `Pending` dropped unfinished aborts its task and waits
//! for its end before letting them go.

use std::sync::Mutex;

use kvshelf::client::ClientError;
use pyo3::IntoPyObjectExt;
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use tokio::task::{AbortHandle, JoinHandle};

use crate::{kvshelf_error, runtime};

/// What a finished call answers.
pub(crate) enum Answer {
    /// Per block: bytes written, `None` for a miss.
    Read(Vec<Option<usize>>),
    /// Per block: `"stored"`, `"already_present"` or `"unavailable"`.
    Put(Vec<&'static str>),
    /// A sidecar fetch: blocks written, and why it stopped there.
    Fetch((usize, &'static str)),
}

/// Why a call failed, turned into a Python exception only under the GIL (the task runs
/// without it).
pub(crate) enum Failure {
    Store(kvshelf::Error),
    Client(ClientError),
    /// The caller's input (a buffer too small for its block): `ValueError`.
    Input(String),
}

impl From<Failure> for PyErr {
    fn from(f: Failure) -> PyErr {
        match f {
            Failure::Store(e) => crate::to_py(e),
            Failure::Client(e) => crate::client::to_py(e),
            Failure::Input(m) => PyValueError::new_err(m),
        }
    }
}

/// The caller's objects a call borrows, released only once the call has ended.
struct Lent {
    _bufs: Vec<PyBuffer<u8>>,
    _keep: Option<Py<PyAny>>,
}

/// A call running on kvshelf's threads over the caller's buffers (see the module docs).
/// Returned by `Store.start_get_into`, `Store.start_put` and `Client.start_fetch_into`.
#[pyclass(frozen, module = "kvshelf._native")]
pub struct Pending {
    abort: AbortHandle,
    /// Taken by the one `wait` (or by `drop`).
    task: Mutex<Option<JoinHandle<Result<Answer, Failure>>>>,
    /// `None` once the task has ended.
    lent: Mutex<Option<Lent>>,
}

impl Pending {
    /// Spawns `work`, which may touch the memory of `bufs` (and of `keep`) until it ends.
    pub(crate) fn spawn(
        work: impl Future<Output = Result<Answer, Failure>> + Send + 'static,
        bufs: Vec<PyBuffer<u8>>,
        keep: Option<Py<PyAny>>,
    ) -> Pending {
        let task = runtime().spawn(work);
        Pending {
            abort: task.abort_handle(),
            task: Mutex::new(Some(task)),
            lent: Mutex::new(Some(Lent {
                _bufs: bufs,
                _keep: keep,
            })),
        }
    }
}

#[pymethods]
impl Pending {
    /// Blocks, with the GIL released, until the call has ended, then releases the buffers
    /// and returns its result (as the synchronous method would). A call cancelled before
    /// it finished raises `KvshelfError` with `code == "cancelled"`; its buffers may hold
    /// part of a payload. Called once.
    fn wait(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let task = self
            .task
            .lock()
            .expect("not poisoned")
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("wait() was already called"))?;
        let joined = py.detach(|| runtime().block_on(task));
        // The task has ended (a JoinHandle resolves after its future is dropped): nothing
        // touches the buffers any more.
        self.lent.lock().expect("not poisoned").take();
        match joined {
            Ok(Ok(Answer::Read(v))) => v.into_py_any(py),
            Ok(Ok(Answer::Put(v))) => v.into_py_any(py),
            Ok(Ok(Answer::Fetch(v))) => v.into_py_any(py),
            Ok(Err(e)) => Err(e.into()),
            Err(e) if e.is_cancelled() => Err(kvshelf_error(
                "the call was cancelled before it finished".into(),
                "cancelled",
            )),
            Err(e) => Err(PyRuntimeError::new_err(format!("kvshelf task failed: {e}"))),
        }
    }

    /// Asks the call to stop and returns at once; `wait` then returns when it has stopped
    /// (at once, unless a poll is copying bytes right now).
    fn cancel(&self) {
        self.abort.abort();
    }

    /// Whether the call has ended.
    fn done(&self) -> bool {
        self.abort.is_finished()
    }
}

impl Drop for Pending {
    /// Nobody will wait for this call: stop it, and let the buffers go only once it has
    /// ended (the task never takes the GIL, so waiting here cannot deadlock).
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().expect("not poisoned").take() {
            task.abort();
            let _ = runtime().block_on(task);
        }
    }
}
