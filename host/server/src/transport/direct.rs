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
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};

use im_proto::codec::LENGTH_PREFIX_BYTES;
use parking_lot::{Mutex, MutexGuard};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

use crate::park::Parker;
use crate::router::ConnControl;

/// A plain TCP connection's socket with its direct-write state, kept in the connection's
/// `ConnControl` (one allocation with its queue). It owns the socket; the connection's task
/// holds the socket's registration with the runtime ([`SharedTcp`]), which a parked
/// connection gives up (`crate::park`).
#[derive(Debug)]
pub struct DirectSocket {
    socket: std::net::TcpStream,
    /// [`RUNNING`], [`PARK_REQUESTED`], or the parker's slot while parked. Apart from
    /// `state`: a parked connection's waker reads it from under `state`'s lock (a frame
    /// queued by a direct writer wakes the connection while holding it).
    park: AtomicU32,
    state: Mutex<WriteState>,
    /// Where the connection parks (`crate::park`); none when the node does not park.
    parker: Weak<Parker>,
}

/// `DirectSocket::park`: the connection runs a task.
const RUNNING: u32 = u32::MAX;
/// The idle sweep asked the task to park when it next has nothing to do.
const PARK_REQUESTED: u32 = u32::MAX - 1;

#[derive(Debug)]
pub struct WriteState {
    /// Frames are queued for the connection's task, or it is writing (or not yet running
    /// its loop): a direct write now would overtake them or split their bytes.
    busy: bool,
    /// The rest of a frame a direct write could write only in part; the task writes it
    /// before anything else. (Boxed twice: rare, and a pointer's room in every connection.)
    unwritten: Option<Box<Box<[u8]>>>,
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
    /// Wraps an accepted socket (made non-blocking here), whose connection may park in
    /// `parker`. It starts busy: the task owns the socket until its loop first finds nothing
    /// to write.
    pub fn new(socket: std::net::TcpStream, parker: Weak<Parker>) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket,
            state: Mutex::new(WriteState {
                busy: true,
                unwritten: None,
            }),
            park: AtomicU32::new(RUNNING),
            parker,
        })
    }

    /// The write state, locked: queue a frame for the task while holding it.
    pub fn lock(&self) -> MutexGuard<'_, WriteState> {
        self.state.lock()
    }

    /// Writes `frame` (with its length prefix) now if nothing is ahead of it, without waiting.
    /// `state` must be this socket's, locked. A parked connection's socket takes direct
    /// writes too: they need no task.
    pub fn write_now(&self, state: &mut WriteState, frame: &[u8]) -> DirectWrite {
        if state.busy {
            return DirectWrite::NotWritten;
        }
        let prefix = (frame.len() as u32).to_be_bytes();
        let total = LENGTH_PREFIX_BYTES + frame.len();
        let parts = [IoSlice::new(&prefix), IoSlice::new(frame)];
        match io::Write::write_vectored(&mut &self.socket, &parts) {
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
                state.unwritten = Some(Box::new(rest.into_boxed_slice()));
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
        state.unwritten.take().map(|rest| *rest)
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

    /// Asks a running connection to park when it next has nothing to do; true when this
    /// asked (the caller wakes the task), false when it was asked already, is parked, or
    /// cannot park (the node does not park connections).
    pub fn request_park(&self) -> bool {
        self.parker.strong_count() > 0
            && self
                .park
                .compare_exchange(RUNNING, PARK_REQUESTED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Takes a request to park: true when one was made and nothing is left to write (no
    /// partial direct write, nothing queued ahead), so the task may park now.
    pub fn take_park_request(&self) -> bool {
        // A plain load first: this runs on every idle poll, and a request is rare.
        self.park.load(Ordering::Relaxed) == PARK_REQUESTED
            && self
                .park
                .compare_exchange(PARK_REQUESTED, RUNNING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            && {
                let state = self.state.lock();
                !state.busy && state.unwritten.is_none()
            }
    }

    /// Where the connection parks, if the node parks connections.
    pub fn parker(&self) -> Option<Arc<Parker>> {
        self.parker.upgrade()
    }

    /// The connection is parked in its parker's slot `key`: a wake resumes it from there.
    /// False when the key is out of range (the connection then stays running).
    pub fn set_parked(&self, key: usize) -> bool {
        match u32::try_from(key) {
            Ok(key) if key < PARK_REQUESTED => {
                self.park.store(key, Ordering::Release);
                true
            }
            _ => false,
        }
    }

    /// The connection runs a task again.
    pub fn set_running(&self) {
        self.park.store(RUNNING, Ordering::Release);
    }

    /// Whether a direct write left a partial frame for the task to finish.
    pub fn has_unwritten(&self) -> bool {
        self.state.lock().unwritten.is_some()
    }

    /// Takes the slot the connection is parked in, if it is: the caller resumes it from
    /// there (it is running from now on). Takes no lock: a parked connection is woken from
    /// under the socket's lock.
    pub fn take_parked(&self) -> Option<usize> {
        self.park
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |park| {
                (park < PARK_REQUESTED).then_some(RUNNING)
            })
            .ok()
            .map(|key| key as usize)
    }
}

impl AsRawFd for DirectSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// The socket's descriptor, registered with the runtime by a running connection's task;
/// the descriptor itself is owned by the [`DirectSocket`].
#[derive(Debug)]
struct Descriptor(RawFd);

impl AsRawFd for Descriptor {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The connection task's reading and writing side of a [`DirectSocket`]: the socket's
/// registration with the runtime, which a parked connection gives up by dropping this.
pub struct SharedTcp {
    // Declared first, dropped first: deregistered while the socket it names is still open.
    io: AsyncFd<Descriptor>,
    /// The connection's control, holding its socket.
    control: Arc<ConnControl>,
}

impl SharedTcp {
    /// The task's side of `control`'s socket, registered with the runtime (call within it).
    pub fn new(control: Arc<ConnControl>) -> io::Result<Self> {
        let fd = control
            .direct_socket()
            .ok_or_else(|| io::Error::other("the connection has no socket of its own"))?
            .as_raw_fd();
        let interest = Interest::READABLE | Interest::WRITABLE;
        // SAFETY: the descriptor is the `DirectSocket`'s, inside the `ConnControl` this
        // holds (and drops after the registration, by field order): it stays open and the
        // same.
        let io = unsafe { AsyncFd::register_with_interest(Descriptor(fd), interest) }?;
        Ok(Self { io, control })
    }

    /// The connection's control, whose socket other threads write to directly.
    pub fn control(&self) -> &Arc<ConnControl> {
        &self.control
    }

    fn socket(&self) -> &std::net::TcpStream {
        &self
            .control
            .direct_socket()
            .expect("checked when created")
            .socket
    }

    /// Writes some of `buf` once the socket has room.
    fn poll_write_some(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut ready = ready!(self.io.poll_write_ready(cx))?;
            // Would block: the readiness was stale and is now cleared, so the next poll waits.
            if let Ok(written) = ready.try_io(|_| io::Write::write(&mut self.socket(), buf)) {
                return Poll::Ready(written);
            }
        }
    }
}

impl AsyncRead for SharedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let socket = self.socket();
        loop {
            let mut ready = ready!(self.io.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let room = unfilled.len();
            let mut read = 0;
            // A read that leaves room in the buffer has drained the socket (epoll is
            // edge-triggered), so the closure says "would block" after it, which clears the
            // readiness, as tokio's own `TcpStream` does: the next read waits for new data
            // instead of finding out with a read that fails.
            let outcome = ready.try_io(|_| {
                read = io::Read::read(&mut &*socket, unfilled)?;
                if read > 0 && read < room {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(())
                }
            });
            match outcome {
                Ok(Ok(())) => {
                    buf.advance(read);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(err)) => return Poll::Ready(Err(err)),
                Err(_would_block) => {
                    if read > 0 {
                        buf.advance(read);
                        return Poll::Ready(Ok(()));
                    }
                    // Readiness was stale; it is cleared, so the next poll waits.
                }
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
        self.poll_write_some(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.socket().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A server-side connection's control, holding its `DirectSocket`, and the client's end
    /// of the connection.
    async fn pair() -> (Arc<ConnControl>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let socket = DirectSocket::new(server.into_std().unwrap(), Weak::new()).unwrap();
        (
            Arc::new(ConnControl::new(0, 8).with_direct_socket(socket)),
            client,
        )
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
        let (control, mut client) = pair().await;
        let mut reading = SharedTcp::new(control).unwrap();
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
        let (control, mut client) = pair().await;
        let socket = control.direct_socket().unwrap();
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
        let (control, mut client) = pair().await;
        let socket = control.direct_socket().unwrap();
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
            let control = control.clone();
            tokio::spawn(async move {
                let mut shared = SharedTcp::new(control.clone()).unwrap();
                tokio::io::AsyncWriteExt::write_all(&mut shared, &rest)
                    .await
                    .unwrap();
                tokio::io::AsyncWriteExt::write_all(&mut shared, &[0, 0, 0, 3, b'e', b'n', b'd'])
                    .await
                    .unwrap();
                control.direct_socket().unwrap().end_write(|| true);
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
