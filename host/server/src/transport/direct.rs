//! A plain TCP socket shared by its connection's task and other threads, which may write a frame to it at once when nothing is queued or being written ahead of it.
//!
//! Why: answering a send through the connection's queue wakes its task, and a dispatcher
//! that wakes two tasks (the sender's ack, the recipient's push) makes the runtime wake a
//! parked worker on another core for the second. Writing the ack from the dispatcher's
//! thread skips both. Order is kept by one rule, checked under [`DirectSocket`]'s lock:
//! a direct write happens only while the socket is not `busy`, and it is busy from the
//! moment anything is queued for the task, or the task starts writing, until the task has
//! written everything and found its queue empty.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use im_proto::codec::LENGTH_PREFIX_BYTES;
use parking_lot::{Mutex, MutexGuard};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A plain TCP connection's socket with its direct-write state.
#[derive(Debug)]
pub struct DirectSocket {
    socket: TcpStream,
    state: Mutex<WriteState>,
}

#[derive(Debug)]
pub struct WriteState {
    /// Frames are queued for the connection's task, or it is writing (or not yet running
    /// its loop): a direct write now would overtake them or split their bytes.
    busy: bool,
    /// The rest of a frame a direct write could write only in part; the task writes it
    /// before anything else.
    unwritten: Option<Box<[u8]>>,
}

impl WriteState {
    /// Marks frames queued for the task (call with the frame queued under the same lock).
    pub fn mark_queued(&mut self) {
        self.busy = true;
    }
}

/// What [`DirectSocket::write_now`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum DirectWrite {
    /// The whole frame is in the socket.
    Written,
    /// Part of it is; the rest waits in the socket's state for the task, which the caller
    /// must wake (the socket is now busy).
    Partial,
    /// Nothing was written: the socket is busy, full or broken. Queue the frame instead.
    NotWritten,
}

impl DirectSocket {
    /// Wraps an accepted socket. It starts busy: the task owns the socket until its loop
    /// first finds nothing to write.
    pub fn new(socket: TcpStream) -> Arc<Self> {
        Arc::new(Self {
            socket,
            state: Mutex::new(WriteState {
                busy: true,
                unwritten: None,
            }),
        })
    }

    /// The write state, locked: queue a frame for the task while holding it.
    pub fn lock(&self) -> MutexGuard<'_, WriteState> {
        self.state.lock()
    }

    /// Writes `frame` (with its length prefix) now if nothing is ahead of it, without waiting.
    /// `state` must be this socket's, locked.
    pub fn write_now(&self, state: &mut WriteState, frame: &[u8]) -> DirectWrite {
        if state.busy {
            return DirectWrite::NotWritten;
        }
        let prefix = (frame.len() as u32).to_be_bytes();
        let total = LENGTH_PREFIX_BYTES + frame.len();
        let parts = [IoSlice::new(&prefix), IoSlice::new(frame)];
        match self.socket.try_write_vectored(&parts) {
            Ok(n) if n >= total => DirectWrite::Written,
            // Nothing went out: the frame can still be queued whole.
            Ok(0) => DirectWrite::NotWritten,
            Ok(n) => {
                let mut rest = Vec::with_capacity(total - n);
                if n < LENGTH_PREFIX_BYTES {
                    rest.extend_from_slice(&prefix[n..]);
                    rest.extend_from_slice(frame);
                } else {
                    rest.extend_from_slice(&frame[n - LENGTH_PREFIX_BYTES..]);
                }
                state.unwritten = Some(rest.into_boxed_slice());
                state.busy = true;
                DirectWrite::Partial
            }
            // Would block, or broken: the task's next read or write finds out which.
            Err(_) => DirectWrite::NotWritten,
        }
    }

    /// The task is about to write (or to look for something to write): the socket is busy
    /// from now on. Returns the rest of a partial direct write, to be written first.
    pub fn begin_write(&self) -> Option<Box<[u8]>> {
        let mut state = self.state.lock();
        state.busy = true;
        state.unwritten.take()
    }

    /// The task has written everything it had. The socket stays busy while `queue_is_empty`
    /// (evaluated under the lock, where frames are queued) says otherwise.
    pub fn end_write(&self, queue_is_empty: impl FnOnce() -> bool) {
        let mut state = self.state.lock();
        if state.unwritten.is_none() && queue_is_empty() {
            state.busy = false;
        }
    }

    /// The task stops writing for good (the connection is closing): no direct write may
    /// follow. Returns the rest of a partial direct write, to be written before the close.
    pub fn retire(&self) -> Option<Box<[u8]>> {
        self.begin_write()
    }

    /// Writes `bytes` whole, waiting for room as needed (the task's side).
    pub async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = std::future::poll_fn(|cx| self.poll_write_some(cx, bytes)).await?;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// Writes some of `buf` once the socket has room.
    fn poll_write_some(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.socket.poll_write_ready(cx))?;
            match self.socket.try_write(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                // Readiness was stale; `try_write` cleared it, so the next poll waits.
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
    }
}

/// The connection task's reading and writing side of a [`DirectSocket`].
pub struct SharedTcp(pub Arc<DirectSocket>);

impl AsyncRead for SharedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let socket = &self.0.socket;
        loop {
            ready!(socket.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let room = unfilled.len();
            let mut read = 0;
            // A read that leaves room in the buffer has drained the socket (epoll is
            // edge-triggered), so the closure says "would block" after it, which clears the
            // readiness, as tokio's own `TcpStream` does: the next read waits for new data
            // instead of finding out with a read that fails.
            let outcome = socket.try_io(Interest::READABLE, || {
                read = io::Read::read(&mut &*socket2::SockRef::from(socket), unfilled)?;
                if read > 0 && read < room {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(())
                }
            });
            match outcome {
                Ok(()) => {
                    buf.advance(read);
                    return Poll::Ready(Ok(()));
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    if read > 0 {
                        buf.advance(read);
                        return Poll::Ready(Ok(()));
                    }
                    // Readiness was stale; it is cleared, so the next poll waits.
                }
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_write_some(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&self.0.socket).shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// A server-side `DirectSocket` and the client's end of its connection.
    async fn pair() -> (Arc<DirectSocket>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (DirectSocket::new(server), client)
    }

    /// Reads one length-prefixed frame.
    async fn read_frame(client: &mut TcpStream) -> Vec<u8> {
        let len = client.read_u32().await.unwrap() as usize;
        let mut frame = vec![0; len];
        client.read_exact(&mut frame).await.unwrap();
        frame
    }

    #[tokio::test]
    async fn reads_that_drain_the_socket_wait_for_more_and_see_the_end() {
        use tokio::io::AsyncWriteExt;
        let (socket, mut client) = pair().await;
        let mut reading = SharedTcp(socket);
        let mut buf = [0u8; 64];
        client.write_all(b"hello").await.unwrap();
        // A read that leaves room clears the readiness: the next one must still be woken
        // by new data.
        assert_eq!(reading.read(&mut buf).await.unwrap(), 5);
        let next = tokio::spawn(async move {
            let n = reading.read(&mut buf).await.unwrap();
            (reading, buf[..n].to_vec())
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        client.write_all(b"world").await.unwrap();
        // A lost wake-up would leave the read waiting: bounded, so it fails instead.
        let (mut reading, got) = tokio::time::timeout(std::time::Duration::from_secs(5), next)
            .await
            .expect("the read was woken by the new data")
            .unwrap();
        assert_eq!(got, b"world");
        // More than the buffer holds, then the end: a full read, the rest, then end of file.
        client.write_all(&[9u8; 100]).await.unwrap();
        client.shutdown().await.unwrap();
        let mut buf = [0u8; 64];
        let mut total = 0;
        loop {
            let n = reading.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            assert!(buf[..n].iter().all(|&b| b == 9));
            total += n;
        }
        assert_eq!(total, 100);
    }

    #[tokio::test]
    async fn a_direct_write_waits_until_the_task_has_written_everything() {
        let (socket, mut client) = pair().await;
        // Busy until the task's loop first finds nothing to write.
        assert_eq!(
            socket.write_now(&mut socket.lock(), b"early"),
            DirectWrite::NotWritten
        );
        socket.end_write(|| true);
        assert_eq!(
            socket.write_now(&mut socket.lock(), b"one"),
            DirectWrite::Written
        );
        // The task writing, then finding its queue not yet empty: still busy.
        assert_eq!(socket.begin_write(), None);
        assert_eq!(
            socket.write_now(&mut socket.lock(), b"two"),
            DirectWrite::NotWritten
        );
        socket.end_write(|| false);
        assert_eq!(
            socket.write_now(&mut socket.lock(), b"two"),
            DirectWrite::NotWritten
        );
        // Something queued under the lock keeps it busy too.
        socket.end_write(|| true);
        socket.lock().mark_queued();
        assert_eq!(
            socket.write_now(&mut socket.lock(), b"two"),
            DirectWrite::NotWritten
        );
        socket.end_write(|| true);
        assert_eq!(
            socket.write_now(&mut socket.lock(), b"three"),
            DirectWrite::Written
        );
        // Retired: nothing direct any more, whatever the queue says.
        assert_eq!(socket.retire(), None);
        assert_eq!(
            socket.write_now(&mut socket.lock(), b"four"),
            DirectWrite::NotWritten
        );
        assert_eq!(read_frame(&mut client).await, b"one");
        assert_eq!(read_frame(&mut client).await, b"three");
    }

    #[tokio::test]
    async fn the_task_finishes_a_frame_the_socket_took_only_in_part() {
        let (socket, mut client) = pair().await;
        socket2::SockRef::from(&socket.socket)
            .set_send_buffer_size(4096)
            .unwrap();
        socket.end_write(|| true);
        // Far more than the socket's buffers hold while the client does not read.
        let big: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(
            socket.write_now(&mut socket.lock(), &big),
            DirectWrite::Partial
        );
        assert_eq!(
            socket.write_now(&mut socket.lock(), b"after"),
            DirectWrite::NotWritten,
            "a half-written frame keeps the socket busy"
        );
        let rest = socket.begin_write().expect("the rest is kept for the task");
        assert!(rest.len() < big.len() + LENGTH_PREFIX_BYTES);
        let writer = {
            let socket = socket.clone();
            tokio::spawn(async move {
                socket.write_all(&rest).await.unwrap();
                let mut shared = SharedTcp(socket.clone());
                tokio::io::AsyncWriteExt::write_all(&mut shared, &[0, 0, 0, 3, b'e', b'n', b'd'])
                    .await
                    .unwrap();
                socket.end_write(|| true);
            })
        };
        assert!(
            read_frame(&mut client).await == big,
            "the frame arrives whole"
        );
        assert_eq!(read_frame(&mut client).await, b"end");
        writer.await.unwrap();
        assert_eq!(
            socket.write_now(&mut socket.lock(), b"direct again"),
            DirectWrite::Written
        );
        assert_eq!(read_frame(&mut client).await, b"direct again");
    }
}
