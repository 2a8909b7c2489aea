//! Deadlines on clients that stop sending or reading (docs/design.md, Security: "a request that
//! stops sending or reading is cut off by a deadline, so idle sockets cannot hold slots or
//! budget").
//!
//! - **A body that stops arriving** (`body_read_timeout`): tower-http's
//!   `RequestBodyTimeoutLayer` (in [`super::router`]) makes every request body fail once no
//!   byte came for that long; the readers ([`super::http`]'s `each_chunk`, [`super::grpc`]'s
//!   admission middleware) recognise that failure with `is_stall` and end the request
//!   `request_timeout`, which drops its admission (slot and body room).
//! - **A response its client does not take** (`response_write_timeout`), in two places,
//!   because hyper stops polling a response body while the client is not reading, so no
//!   timer inside the body can fire:
//!   - [`Deadlined`], around every accepted socket: a write that makes no progress for that
//!     long fails, and hyper closes the connection (HTTP/1.1, and HTTP/2 whose client stopped
//!     reading the socket altogether).
//!   - `send_within`, around fetch responses: each item must be taken by the transport
//!     within that long. An HTTP/2 client can keep reading its socket while one stream's
//!     flow-control window stays shut (its application stopped reading that stream); the
//!     socket then never stalls. Past the deadline the fetch is dropped (slot and queued
//!     blocks given back) and the connection is cut through its [`Cutoff`]: hyper cannot
//!     reset a stream whose body it is not polling, and the blocks it already holds are
//!     freed only with the connection.
//!
//! hyper's own `header_read_timeout` and HTTP/2 keep-alive pings are not used: `axum::serve`
//! does not expose hyper's builder, a request holds no slot or budget before its head is
//! read (admission runs in the handler), and a peer that answers pings can still stall.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use futures_util::task::AtomicWaker;
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Whether a request body failed because `body_read_timeout` passed without a byte.
pub(super) fn is_stall(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// A handle that closes one connection from outside hyper (a response whose client stopped
/// taking it). Handlers find it in the request's extensions as `ConnectInfo<Cutoff>`.
#[derive(Clone, Debug, Default)]
pub struct Cutoff(Arc<CutState>);

#[derive(Debug, Default)]
struct CutState {
    cut: AtomicBool,
    /// The connection task, woken to see the cut.
    task: AtomicWaker,
}

impl Cutoff {
    /// Closes the connection: its socket's reads and writes fail from now on, so hyper
    /// drops it with every request and response on it. Counted once per connection.
    pub fn cut(&self) {
        if !self.0.cut.swap(true, Ordering::AcqRel) {
            metrics::counter!("kvshelf_stalled_requests_total", "reason" => "response_write_timeout")
                .increment(1);
        }
        self.0.task.wake();
    }

    fn is_cut(&self) -> bool {
        self.0.cut.load(Ordering::Acquire)
    }
}

impl<L: Listener> Connected<IncomingStream<'_, Deadlines<L>>> for Cutoff {
    fn connect_info(stream: IncomingStream<'_, Deadlines<L>>) -> Self {
        stream.io().cutoff.clone()
    }
}

/// A listener whose connections are [`Deadlined`].
#[derive(Debug)]
pub struct Deadlines<L> {
    inner: L,
    write_timeout: Duration,
}

impl<L> Deadlines<L> {
    /// Wraps `inner`: every write of its connections must make progress within
    /// `write_timeout`.
    pub fn new(inner: L, write_timeout: Duration) -> Self {
        Deadlines {
            inner,
            write_timeout,
        }
    }
}

impl<L: Listener> Listener for Deadlines<L> {
    type Io = Deadlined<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.inner.accept().await;
        let io = Deadlined {
            io,
            write_timeout: self.write_timeout,
            stalled: None,
            cutoff: Cutoff::default(),
        };
        (io, addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A socket whose writes fail once they make no progress for `write_timeout` (the client
/// stopped reading), and whose reads and writes fail once it is [`Cutoff::cut`].
#[derive(Debug)]
pub struct Deadlined<IO> {
    io: IO,
    write_timeout: Duration,
    /// Armed while a write is pending; disarmed by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
    cutoff: Cutoff,
}

impl<IO> Deadlined<IO> {
    fn check_cut(&self, cx: &Context<'_>) -> io::Result<()> {
        self.cutoff.0.task.register(cx.waker());
        match self.cutoff.is_cut() {
            true => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "response_write_timeout: the client stopped reading",
            )),
            false => Ok(()),
        }
    }

    /// Runs one write-side operation under the write deadline.
    fn write_op<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(&mut IO, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        self.check_cut(cx)?;
        match op(&mut self.io, cx) {
            Poll::Pending => {
                let timeout = self.write_timeout;
                let stalled = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if stalled.as_mut().poll(cx).is_ready() {
                    self.cutoff.cut();
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "response_write_timeout: the client took nothing",
                    )));
                }
                Poll::Pending
            }
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Deadlined<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        me.check_cut(cx)?;
        Pin::new(&mut me.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Deadlined<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .write_op(cx, |io, cx| Pin::new(io).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .write_op(cx, |io, cx| Pin::new(io).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut()
            .write_op(cx, |io, cx| Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut()
            .write_op(cx, |io, cx| Pin::new(io).poll_shutdown(cx))
    }
}

/// `items` as the transport takes them, each within `timeout` of being ready: the items are
/// handed over one at a time by a task of their own, so that the deadline runs even while
/// the transport polls nothing. An item not taken in time drops `items` (a fetch gives its
/// slot and queued blocks back) and cuts the connection (see the module doc).
pub(super) fn send_within<S>(
    items: S,
    timeout: Duration,
    cutoff: Option<Cutoff>,
) -> impl Stream<Item = S::Item> + Send + 'static
where
    S: Stream + Send + 'static,
    S::Item: Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut items = Box::pin(items);
        while let Some(item) = items.next().await {
            match tokio::time::timeout(timeout, tx.send(item)).await {
                Ok(Ok(())) => {}
                // The transport dropped the response: the client went away.
                Ok(Err(_)) => return,
                Err(_) => {
                    drop(items);
                    match &cutoff {
                        Some(c) => c.cut(),
                        None => metrics::counter!(
                            "kvshelf_stalled_requests_total",
                            "reason" => "response_write_timeout"
                        )
                        .increment(1),
                    }
                    return;
                }
            }
        }
    });
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
