//! The WebSocket listener (plain or TLS): one binary message per frame; text messages are refused.

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use im_proto::v1::CloseReason;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::task::TaskTracker;

use super::{FrameConn, RecvError, Transport};
use crate::session::{NodeContext, run_session};

/// WebSocket close code sent for each close reason (see docs/protocol.md).
pub fn close_code(reason: CloseReason) -> u16 {
    match reason {
        CloseReason::FrameTooLarge => 1009,
        CloseReason::ServerShutdown => 1001,
        CloseReason::ProtocolViolation => 1003,
        other => 4000 + other as u16,
    }
}

fn ws_config(max_frame_bytes: usize) -> WebSocketConfig {
    // Small buffers: tungstenite's defaults (128 KiB read buffer) would dominate the memory
    // of an idle connection, which keeps its read buffer. 256 bytes hold a typical chat
    // frame whole (the TCP reader's inline buffer is as large). A larger frame reserves its
    // whole length once its header is read, but tungstenite reads it at most this many bytes
    // per system call: a 32 KiB frame takes 128 reads. Idle memory is the cost that scales
    // with every connection, so it wins (docs/benchmarks.md).
    WebSocketConfig::default()
        .read_buffer_size(256)
        .write_buffer_size(0)
        .max_write_buffer_size(max_frame_bytes * 4)
        .max_message_size(Some(max_frame_bytes))
        .max_frame_size(Some(max_frame_bytes))
}

/// A WebSocket carrying one frame per binary message.
pub struct WsConn<S> {
    ws: WebSocketStream<S>,
    transport: Transport,
    max_frame_bytes: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> FrameConn for WsConn<S> {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, RecvError>> {
        loop {
            let Some(message) = ready!(self.ws.poll_next_unpin(cx)) else {
                return Poll::Ready(Ok(None));
            };
            let received = match message {
                Ok(Message::Binary(data)) => Ok(Some(data)),
                Ok(Message::Text(_)) => Err(RecvError::Protocol(
                    "text messages are not accepted; send binary frames".into(),
                )),
                Ok(Message::Close(_)) => Ok(None),
                // tungstenite answers pings itself.
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                Err(tungstenite::Error::Capacity(err)) => Err(RecvError::TooLarge {
                    len: capacity_len(&err),
                    max: self.max_frame_bytes,
                }),
                Err(tungstenite::Error::Io(err)) => Err(RecvError::Io(err)),
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    Ok(None)
                }
                Err(err) => Err(RecvError::Protocol(err.to_string())),
            };
            return Poll::Ready(received);
        }
    }

    async fn send(&mut self, frames: &[Bytes]) -> io::Result<()> {
        for frame in frames {
            self.ws
                .feed(Message::Binary(frame.clone()))
                .await
                .map_err(to_io)?;
        }
        self.ws.flush().await.map_err(to_io)
    }

    async fn close(&mut self, reason: CloseReason, close_frame: Bytes) {
        let _ = self.ws.feed(Message::Binary(close_frame)).await;
        let frame = CloseFrame {
            code: CloseCode::from(close_code(reason)),
            reason: reason.as_str_name().into(),
        };
        let _ = self.ws.close(Some(frame)).await;
    }

    fn transport(&self) -> Transport {
        self.transport
    }
}

fn capacity_len(err: &tungstenite::error::CapacityError) -> usize {
    match err {
        tungstenite::error::CapacityError::MessageTooLong { size, .. } => *size,
        _ => 0,
    }
}

fn to_io(err: tungstenite::Error) -> io::Error {
    match err {
        tungstenite::Error::Io(e) => e,
        other => io::Error::other(other),
    }
}

/// Accepts connections until shutdown, one session task each.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ctx: Arc<NodeContext>,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(error = %err, "websocket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let deadline = tokio::time::Instant::now() + ctx.login_timeout();
        // One task type per case: a plain connection's task is not sized for TLS state.
        match &tls {
            None => {
                tasks.spawn(upgrade_and_run(
                    stream,
                    Transport::WebSocket,
                    deadline,
                    ctx,
                    peer,
                ));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tasks.spawn(async move {
                    match tokio::time::timeout_at(deadline, Box::pin(acceptor.accept(stream))).await
                    {
                        Ok(Ok(stream)) => {
                            upgrade_and_run(stream, Transport::WebSocketTls, deadline, ctx, peer)
                                .await
                        }
                        Ok(Err(err)) => {
                            tracing::debug!(%peer, error = %err, "tls handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                    }
                });
            }
        }
    }
}

/// Completes the WebSocket handshake (by `deadline`) and runs the session.
async fn upgrade_and_run<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    transport: Transport,
    deadline: tokio::time::Instant,
    ctx: Arc<NodeContext>,
    peer: std::net::SocketAddr,
) {
    let max_frame_bytes = ctx.config.limits.max_frame_bytes;
    // Boxed, so the handshake's state is freed when it ends instead of sizing the
    // connection's task for its whole life.
    let handshake = Box::pin(tokio_tungstenite::accept_async_with_config(
        stream,
        Some(ws_config(max_frame_bytes)),
    ));
    match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(ws)) => {
            run_session(
                ctx,
                WsConn {
                    ws,
                    transport,
                    max_frame_bytes,
                },
                peer,
            )
            .await
        }
        Ok(Err(err)) => tracing::debug!(%peer, error = %err, "websocket handshake failed"),
        Err(_) => tracing::debug!(%peer, "websocket handshake timed out"),
    }
}
