//! The TCP listener (plain or TLS): length-prefixed frames on the byte stream.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use super::Transport;
use super::direct::DirectSocket;
use super::stream::StreamConn;
use crate::router::{ConnControl, monotonic_ms};
use crate::session::{NodeContext, run_session};

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
                // Typically EMFILE: back off instead of spinning.
                tracing::warn!(error = %err, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let max = ctx.config.limits.max_frame_bytes;
        match &tls {
            None => {
                // The socket is owned by its `DirectSocket`; the task registers it again.
                let parker = ctx.parker.as_ref().map(Arc::downgrade).unwrap_or_default();
                let queue = ctx.config.limits.outbound_queue;
                let conn = stream
                    .into_std()
                    .and_then(|stream| DirectSocket::new(stream, parker))
                    .and_then(|socket| {
                        // Made now, with the socket in it; the login sets its clock.
                        let control = ConnControl::new(monotonic_ms(), queue);
                        StreamConn::plain_tcp(Arc::new(control.with_direct_socket(socket)), max)
                    });
                match conn {
                    Ok(conn) => {
                        tasks.spawn(run_session(ctx, conn, peer));
                    }
                    Err(err) => tracing::warn!(%peer, error = %err, "tcp connection not set up"),
                }
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tasks.spawn(async move {
                    // Boxed: the handshake's state is freed when it ends.
                    let handshake = tokio::time::timeout(
                        ctx.login_timeout(),
                        Box::pin(acceptor.accept(stream)),
                    )
                    .await;
                    match handshake {
                        Ok(Ok(stream)) => {
                            run_session(ctx, StreamConn::new(stream, max, Transport::Tls), peer)
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
