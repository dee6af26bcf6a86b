//! Transports: turn TCP, WebSocket and QUIC connections into [`FrameConn`]s for the session layer.
//!
//! A transport knows only how frames are delimited and how a connection closes; it never
//! looks inside a frame. Listeners accept until the node's shutdown token fires and run one
//! session per connection.

use std::future::Future;
use std::io;
use std::task::{Context, Poll};

use bytes::Bytes;
use im_proto::v1::CloseReason;

pub mod direct;
pub mod quic;
pub mod stream;
pub mod tcp;
pub mod tls;
pub mod ws;

/// Which transport a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Tls,
    WebSocket,
    WebSocketTls,
    Quic,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tcp+tls",
            Transport::WebSocket => "ws",
            Transport::WebSocketTls => "wss",
            Transport::Quic => "quic",
        }
    }
}

/// Why no frame could be received.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("connection failed: {0}")]
    Io(#[from] io::Error),
}

/// A connection carrying whole frames.
pub trait FrameConn: Send + 'static {
    /// Polls for the next frame; `Ok(None)` when the peer closed cleanly. Keeps its state
    /// in the connection, not in a future: it is polled beside the outbound queue and
    /// timers in every idle connection's task, whose size is what an idle connection costs.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, RecvError>>;

    /// The next frame; `Ok(None)` when the peer closed cleanly. Cancel-safe.
    fn recv(&mut self) -> impl Future<Output = Result<Option<Bytes>, RecvError>> + Send {
        std::future::poll_fn(move |cx| self.poll_recv(cx))
    }

    /// Writes frames, in order, as one batch where the transport allows.
    fn send(&mut self, frames: &[Bytes]) -> impl Future<Output = io::Result<()>> + Send;

    /// Writes `bytes` as they are: the rest of a frame a direct write left half-written
    /// (only transports with a direct socket have any).
    fn write_raw(&mut self, _bytes: &[u8]) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(Err(io::ErrorKind::Unsupported.into()))
    }

    /// Best effort: sends `Close{reason}` (encoded as `close_frame`) and closes the connection.
    fn close(&mut self, reason: CloseReason, close_frame: Bytes)
    -> impl Future<Output = ()> + Send;

    fn transport(&self) -> Transport;

    /// The connection's control, made with its socket when it was accepted: other threads
    /// may write whole frames to that socket without waiting (plain TCP only).
    fn control(&self) -> Option<std::sync::Arc<crate::router::ConnControl>> {
        None
    }

    /// Gives the connection up to park it (`crate::park`): its registration with the runtime
    /// goes, its reader (holding any part of a frame still arriving) is returned. Connections
    /// that cannot park (all but plain TCP) are given back.
    fn into_parked(self) -> Result<im_proto::codec::FrameReader, Self>
    where
        Self: Sized,
    {
        Err(self)
    }
}
