//! The IM server node: transports, sessions, routing, reliable delivery and wiring.
//!
//! Layout (data flows top to bottom):
//! - [`transport`]: TCP, WebSocket and QUIC listeners turning connections into frame streams;
//! - [`session`]: one task per connection: login, heartbeat, requests, the delivery loop;
//! - [`park`]: idle plain-TCP connections parked without a task, resumed by socket or queue;
//! - [`delivery`]: sans-IO tracking and re-push schedule of unacknowledged deliveries;
//! - [`groups`]: group requests (checks, policy, announcements) and the membership cache;
//! - [`pipeline`]: group commit of sends and group changes, then acks and pushes in seq order;
//! - [`router`]: which devices are online here, with bounded per-connection queues;
//! - [`cursors`]: batched persistence of per-device delivery cursors;
//! - [`auth`]: the authentication seam: plugin authenticators, development tokens;
//! - [`presence`]: who watches whose online state (kept inside the router's lock);
//! - [`rooms`]: live rooms and their (never stored) fan-out;
//! - [`api`]: the HTTP API for business back-ends, health, readiness, metrics, OpenAPI;
//! - [`metrics`]: the node's Prometheus recorder;
//! - [`admin`]: the local admin HTTP API (plugin lifecycle);
//! - [`config`], [`node`], [`cli`]: configuration, wiring and the binary.

pub mod admin;
pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod cursors;
pub mod delivery;
pub mod groups;
pub mod metrics;
pub mod node;
pub mod park;
pub mod pipeline;
pub mod presence;
pub mod rooms;
pub mod router;
pub mod session;
#[cfg(test)]
mod testing;
pub mod transport;

pub use config::Config;
pub use node::RunningNode;
