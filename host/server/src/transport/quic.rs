//! The QUIC listener (quinn): one bidirectional stream per connection carries length-prefixed frames.
//!
//! All QUIC connections share the endpoint's one UDP socket, so their number is not bounded
//! by the process's file-descriptor limit.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::Transport;
use super::stream::StreamConn;
use crate::session::{NodeContext, run_session};

/// How long the server waits, after its last frame, for the client to close the connection,
/// so the final frames (such as a close notice) are not discarded by an immediate close.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// How long shutdown waits for open connections to finish before closing the endpoint
/// (longer than a session's close linger).
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// Accepts connections until shutdown, one session task each.
pub async fn serve(endpoint: quinn::Endpoint, ctx: Arc<NodeContext>, tasks: TaskTracker) {
    loop {
        let incoming = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        let ctx = ctx.clone();
        tasks.spawn(async move {
            let peer = incoming.remote_address();
            let deadline = ctx.login_timeout();
            // Boxed: the handshake's state is freed when it ends.
            // Given up at shutdown too: the endpoint waits for its connections to finish.
            let opened = tokio::select! {
                opened = tokio::time::timeout(
                    deadline,
                    Box::pin(async {
                        let connection = incoming.await?;
                        let (send, recv) = connection.accept_bi().await?;
                        Ok::<_, quinn::ConnectionError>((connection, send, recv))
                    }),
                ) => opened,
                _ = ctx.shutdown.cancelled() => return,
            };
            let (connection, send, recv) = match opened {
                Ok(Ok(opened)) => opened,
                Ok(Err(err)) => {
                    tracing::debug!(%peer, error = %err, "quic connection failed before its stream opened");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "quic connection opened no stream in time");
                    return;
                }
            };
            let max = ctx.config.limits.max_frame_bytes;
            let stream = tokio::io::join(recv, send);
            run_session(ctx, StreamConn::new(stream, max, Transport::Quic), peer).await;
            let _ = tokio::time::timeout(CLOSE_LINGER, connection.closed()).await;
            connection.close(0u32.into(), b"closed");
        });
    }
    // Refuse new connections but let the open ones deliver their close notices (the
    // router closes every session at shutdown): closing the endpoint at once would cut
    // them off before their last frames.
    endpoint.set_server_config(None);
    let _ = tokio::time::timeout(SHUTDOWN_DRAIN, endpoint.wait_idle()).await;
    endpoint.close(0u32.into(), b"server shutdown");
}
