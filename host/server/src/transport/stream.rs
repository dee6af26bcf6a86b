//! [`FrameConn`] over any byte stream with 4-byte length-prefixed frames (TCP, TLS, a QUIC stream).

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use im_proto::codec::{FrameError, FrameReader, LENGTH_PREFIX_BYTES};
use im_proto::v1::CloseReason;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::direct::SharedTcp;
use super::{FrameConn, RecvError, Transport};
use crate::router::ConnControl;

/// A byte stream carrying frames. Plain TCP's socket also takes writes from other threads.
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Whether a connection over this stream may park (`crate::park`; plain TCP only).
    const PARKS: bool = false;

    /// The connection's control made with its socket, which other threads may write whole
    /// frames to (plain TCP only).
    fn control(&self) -> Option<Arc<ConnControl>> {
        None
    }
}

impl ByteStream for SharedTcp {
    const PARKS: bool = true;

    fn control(&self) -> Option<Arc<ConnControl>> {
        Some(self.control().clone())
    }
}

impl ByteStream for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {}

impl ByteStream for tokio::io::Join<quinn::RecvStream, quinn::SendStream> {}

/// Length-prefixed frames over `S`.
pub struct StreamConn<S> {
    stream: S,
    reader: FrameReader,
    transport: Transport,
}

impl<S> StreamConn<S> {
    pub fn new(stream: S, max_frame_bytes: usize, transport: Transport) -> Self {
        Self {
            stream,
            reader: FrameReader::new(max_frame_bytes),
            transport,
        }
    }
}

impl StreamConn<SharedTcp> {
    /// A plain TCP connection whose socket, in `control`, other threads may write to
    /// directly (call within the runtime, which it registers with).
    pub fn plain_tcp(control: Arc<ConnControl>, max_frame_bytes: usize) -> io::Result<Self> {
        Self::resumed_tcp(control, FrameReader::new(max_frame_bytes))
    }

    /// A parked plain TCP connection going on with `reader` (`FrameConn::into_parked`).
    pub fn resumed_tcp(control: Arc<ConnControl>, reader: FrameReader) -> io::Result<Self> {
        Ok(Self {
            stream: SharedTcp::new(control)?,
            reader,
            transport: Transport::Tcp,
        })
    }
}

impl<S: ByteStream> FrameConn for StreamConn<S> {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, RecvError>> {
        let frame = ready!(self.reader.poll_frame(&mut self.stream, cx));
        Poll::Ready(match frame {
            Ok(frame) => Ok(frame),
            Err(FrameError::TooLarge { len, max }) => Err(RecvError::TooLarge { len, max }),
            Err(FrameError::Truncated) => Err(RecvError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed mid-frame",
            ))),
            Err(FrameError::Io(e)) => Err(RecvError::Io(e)),
        })
    }

    async fn send(&mut self, frames: &[Bytes]) -> io::Result<()> {
        // One buffer, one write: allocated per batch and freed after, so idle connections
        // hold no write buffer.
        let total: usize = frames.iter().map(|f| f.len() + LENGTH_PREFIX_BYTES).sum();
        let mut buf = Vec::with_capacity(total);
        for frame in frames {
            im_proto::codec::put_frame(&mut buf, frame);
        }
        self.stream.write_all(&buf).await?;
        self.stream.flush().await
    }

    async fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    async fn close(&mut self, _reason: CloseReason, close_frame: Bytes) {
        let _ = self.send(&[close_frame]).await;
        let _ = self.stream.shutdown().await;
    }

    fn transport(&self) -> Transport {
        self.transport
    }

    fn control(&self) -> Option<Arc<ConnControl>> {
        self.stream.control()
    }

    fn into_parked(self) -> Result<FrameReader, Self> {
        if !S::PARKS {
            return Err(self);
        }
        Ok(self.reader)
    }
}
