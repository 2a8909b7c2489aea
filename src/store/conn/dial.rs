//! Dialling one Redis node: its address, what a connection says after it connects (the
//! login), and the TCP or TLS stream a [`Conn`](super::Conn) reads and writes.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::error::BackendError;
#[cfg(feature = "tls")]
use crate::error::BackendErrorKind;

/// TCP keepalive on every Redis socket: first probe after this much silence...
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// ...then one per this interval (the kernel's probe count, 9 on Linux, before it is dead).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// A node's address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Addr {
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// What every connection of a store says after it connects: its ACL user, password and
/// database. The same for every node of a topology.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct Login {
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) db: i64,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .finish()
    }
}

/// How a pool dials and how long it waits; shared by every pool of a store.
#[derive(Debug)]
pub(crate) struct Dialer {
    pub(crate) login: Login,
    pub(crate) tls: Option<Tls>,
    pub(crate) connect_timeout: Duration,
    pub(crate) response_timeout: Duration,
    pub(crate) command_retries: u32,
    pub(crate) max_connections: usize,
    pub(crate) connect_rate: u32,
}

/// TLS (`rediss://`): rustls with the CA file's certificates or the system's.
#[derive(Clone)]
pub(crate) struct Tls {
    #[cfg(feature = "tls")]
    pub(crate) connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

/// A TCP or TLS stream.
pub(super) enum Stream {
    Tcp(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// Sets `SO_RCVLOWAT` on a TCP stream: the socket is reported readable only once this
    /// many bytes are queued (or the peer closed), so a large payload is received in a few
    /// large reads rather than one per segment. TLS streams are left alone (records).
    pub(super) fn set_recv_lowat(&self, bytes: usize) {
        match self {
            Stream::Tcp(tcp) => {
                use std::os::fd::AsRawFd;
                let v: libc::c_int = bytes.clamp(1, 1 << 30) as libc::c_int;
                // SAFETY: a valid socket fd and an int option of the right size. A failure
                // (not expected on Linux) leaves the socket as it was: reads still work.
                unsafe {
                    libc::setsockopt(
                        tcp.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_RCVLOWAT,
                        (&v as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    );
                }
            }
            #[cfg(feature = "tls")]
            Stream::Tls(_) => {}
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A stream to `addr`: TCP with keepalive, then TLS when `dialer.tls`.
pub(super) async fn connect(addr: &Addr, dialer: &Dialer) -> Result<Stream, BackendError> {
    let io = |e: std::io::Error| BackendError::io(&format!("redis {addr}"), &e);
    let tcp = TcpStream::connect((addr.host.as_str(), addr.port))
        .await
        .map_err(io)?;
    tcp.set_nodelay(true).map_err(io)?;
    // Keepalive, so an idle connection whose peer vanished without a FIN (a middlebox
    // dropped the flow, a host died) is found dead by the kernel rather than on first
    // use. Calls in flight have their own deadlines; tracking has its own heartbeat.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    socket2::SockRef::from(&tcp)
        .set_tcp_keepalive(&keepalive)
        .map_err(io)?;
    Ok(match &dialer.tls {
        None => Stream::Tcp(tcp),
        #[cfg(feature = "tls")]
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from(addr.host.clone())
                .map_err(|e| BackendError::new(BackendErrorKind::Io, format!("{addr}: {e}")))?;
            Stream::Tls(Box::new(
                tls.connector.connect(name, tcp).await.map_err(io)?,
            ))
        }
        #[cfg(not(feature = "tls"))]
        Some(_) => unreachable!("a Tls is only made with the tls feature"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_debug_hides_the_password() {
        let l = Login {
            username: Some("kv".into()),
            password: Some("hunter2".into()),
            db: 0,
        };
        let shown = format!("{l:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
    }

    /// Issue 18 §1: every socket kvshelf dials has TCP keepalive on (idle time and probe
    /// interval are set by the same call), so a peer that vanished without a FIN is found
    /// dead by the kernel.
    #[tokio::test]
    async fn every_dialled_socket_has_keepalive() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = Addr {
            host: "127.0.0.1".into(),
            port: listener.local_addr().unwrap().port(),
        };
        let dialer = Dialer {
            login: Login::default(),
            tls: None,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            command_retries: 0,
            max_connections: 1,
            connect_rate: 0,
        };
        let stream = connect(&addr, &dialer).await.unwrap();
        let Stream::Tcp(tcp) = &stream else {
            panic!("no TLS was asked for")
        };
        let sock = socket2::SockRef::from(tcp);
        assert!(sock.keepalive().unwrap(), "SO_KEEPALIVE");
        assert!(sock.tcp_nodelay().unwrap(), "TCP_NODELAY");
    }
}
