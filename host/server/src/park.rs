//! Idle plain-TCP connections parked without a task or a runtime registration of their own: their sessions wait in one slab, their sockets in one epoll set of the node's.
//!
//! Why: a tokio task (384 bytes for a session) and an I/O registration (256 bytes) are the
//! fixed cost of a connection on tokio, and most connections of an IM server are idle. A
//! parked connection keeps only its session's fields (a box in the slab) and its socket in
//! this epoll set, which is itself one registration with the runtime ([`ParkerPump`]).
//!
//! A connection is resumed, its task spawned again, by whichever comes first: its socket
//! becoming readable (the pump), or its `ConnControl` waking it (something queued, a close
//! requested, a partial direct write), whose waker while parked is the `ConnControl`
//! itself. The slab is the arbiter: whoever removes the session resumes it, once.
//! Direct writes need no task and go on while a connection is parked.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mio::unix::SourceFd;
use parking_lot::Mutex;
use slab::Slab;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::router::ConnControl;
use crate::transport::direct::DirectSocket;

/// A parked connection's session, resumed by spawning its task again.
pub trait ParkedConn: Send {
    /// The connection's control, holding its socket.
    fn control(&self) -> &Arc<ConnControl>;

    /// The connection's socket.
    fn socket(&self) -> &DirectSocket {
        self.control()
            .direct_socket()
            .expect("only connections with a socket of their own park")
    }
    /// Spawns the connection's task again, on `runtime`, tracked by `tasks`.
    fn resume(self: Box<Self>, tasks: &TaskTracker, runtime: &Handle);
}

/// A slot of the slab.
enum Slot {
    /// Reserved by a connection on its way to park; `woken` when something woke it meanwhile
    /// (it then stays running).
    Parking {
        woken: bool,
    },
    Parked(Box<dyn ParkedConn>),
}

/// The node's parked connections.
pub struct Parker {
    slots: Mutex<Slab<Slot>>,
    /// The epoll set of parked sockets (the pump polls it).
    registry: mio::Registry,
    runtime: Handle,
    /// The node's session tasks: a parked connection holds a token of it, so a shutdown
    /// waits for parked connections as for running ones.
    sessions: TaskTracker,
    parked: AtomicUsize,
}

/// Waits on the parked sockets' epoll set and resumes the connections whose socket became
/// readable (or was closed by the peer).
pub struct ParkerPump {
    poll: mio::Poll,
    parker: Arc<Parker>,
}

impl Parker {
    /// A parker spawning resumed sessions on the current runtime, tracked by `sessions`; its
    /// pump must run for parked sockets to be heard.
    pub fn new(sessions: TaskTracker) -> io::Result<(Arc<Self>, ParkerPump)> {
        let poll = mio::Poll::new()?;
        let parker = Arc::new(Self {
            slots: Mutex::new(Slab::new()),
            registry: poll.registry().try_clone()?,
            runtime: Handle::current(),
            sessions,
            parked: AtomicUsize::new(0),
        });
        let pump = ParkerPump {
            poll,
            parker: parker.clone(),
        };
        Ok((parker, pump))
    }

    /// A token that keeps the node's session tracker from finishing while a session is
    /// parked.
    pub fn track(&self) -> TaskTrackerToken {
        self.sessions.token()
    }

    /// Connections parked now.
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::Relaxed)
    }

    /// Reserves a slot for a connection about to park; wakes meanwhile are remembered.
    pub fn reserve(&self) -> usize {
        self.slots.lock().insert(Slot::Parking { woken: false })
    }

    /// Gives back a reserved slot (the connection did not park).
    pub fn cancel(&self, key: usize) {
        let mut slots = self.slots.lock();
        if matches!(slots.get(key), Some(Slot::Parking { .. })) {
            slots.remove(key);
        }
    }

    /// Parks `conn` in its reserved slot `key` and adds its socket to the epoll set. Gives
    /// it back when it was woken since the reservation or its socket could not be added:
    /// it must then go on running.
    pub fn fill<P: ParkedConn + 'static>(&self, key: usize, conn: Box<P>) -> Result<(), Box<P>> {
        let fd = conn.socket().as_raw_fd();
        let mut slots = self.slots.lock();
        let Some(slot) = slots.get_mut(key) else {
            return Err(conn);
        };
        if !matches!(slot, Slot::Parking { woken: false }) {
            slots.remove(key);
            return Err(conn);
        }
        // Readiness already there when it is added is reported at once (epoll checks on
        // insertion), so nothing that arrived since the runtime's registration went is lost.
        if let Err(err) =
            self.registry
                .register(&mut SourceFd(&fd), mio::Token(key), mio::Interest::READABLE)
        {
            tracing::debug!(error = %err, "a connection could not park");
            slots.remove(key);
            return Err(conn);
        }
        *slot = Slot::Parked(conn);
        self.parked.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Spawns the task of a connection taken from the slab, or woken on its way to park:
    /// it runs from now on.
    pub fn respawn(&self, conn: Box<dyn ParkedConn>) {
        conn.socket().set_running();
        conn.resume(&self.sessions, &self.runtime);
    }

    /// Resumes the connection in slot `key`, if one is parked there (and, when `from` is
    /// given, it is that socket's): its task is spawned again. A connection still on its
    /// way to park is marked woken instead, and stays running.
    pub fn resume(&self, key: usize, from: Option<&ConnControl>) {
        let conn = {
            let mut slots = self.slots.lock();
            match slots.get_mut(key) {
                None => return,
                Some(Slot::Parking { woken }) => {
                    *woken = true;
                    return;
                }
                Some(Slot::Parked(conn)) => {
                    if from.is_some_and(|control| !std::ptr::eq(control, &**conn.control())) {
                        // A stale key: the slot went to another connection.
                        return;
                    }
                }
            }
            match slots.remove(key) {
                Slot::Parked(conn) => conn,
                Slot::Parking { .. } => unreachable!("checked above under the same lock"),
            }
        };
        self.parked.fetch_sub(1, Ordering::Relaxed);
        // Removed before the task registers the socket with the runtime again; an event
        // already taken from the set finds the slot empty (or another connection's, which
        // then merely resumes early).
        let _ = self
            .registry
            .deregister(&mut SourceFd(&conn.socket().as_raw_fd()));
        self.respawn(conn);
    }
}

/// Events taken from the epoll set per poll.
const EVENTS_PER_POLL: usize = 256;

impl ParkerPump {
    /// Resumes connections whose socket became readable, until `shutdown` (a shutdown's
    /// close requests resume every parked connection through its waker).
    pub async fn run(self, shutdown: CancellationToken) {
        let ParkerPump { poll, parker } = self;
        // SAFETY: the `AsyncFd` owns the epoll set whose descriptor it registers.
        let registered = unsafe { AsyncFd::register_with_interest(poll, Interest::READABLE) };
        let mut poll = match registered {
            Ok(poll) => poll,
            Err(err) => {
                tracing::error!(error = %err, "parked connections cannot be heard: parking stops");
                return;
            }
        };
        let mut events = mio::Events::with_capacity(EVENTS_PER_POLL);
        loop {
            let mut ready = tokio::select! {
                _ = shutdown.cancelled() => return,
                ready = poll.readable_mut() => match ready {
                    Ok(ready) => ready,
                    Err(err) => {
                        tracing::error!(error = %err, "polling parked connections failed");
                        return;
                    }
                },
            };
            let polled = ready.try_io(|poll| {
                poll.get_mut().poll(&mut events, Some(Duration::ZERO))?;
                if events.is_empty() {
                    // Drained: the readiness is cleared, the next wait is for new events.
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(())
                }
            });
            match polled {
                Ok(Ok(())) => {
                    for event in events.iter() {
                        parker.resume(event.token().0, None);
                    }
                }
                Ok(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(err)) => {
                    tracing::error!(error = %err, "polling parked connections failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(_would_block) => {}
            }
        }
    }
}
