//! The im.v1 client protocol: generated message types, the length-prefixed frame codec and identifier rules.
//!
//! Layout:
//! - [`v1`]: prost types generated from `proto/im/v1/im.proto` (the source of truth);
//! - [`codec`]: 4-byte big-endian length-prefixed framing for byte streams (TCP, TLS, QUIC);
//! - [`ids`]: validation of user/device ids and 1:1 conversation ids.

pub mod codec;
pub mod ids;

/// Types generated from `im/v1/im.proto`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/im.v1.rs"));
}

/// ALPN protocol id that QUIC clients must offer.
pub const QUIC_ALPN: &[u8] = b"im/1";

/// Default largest frame, in bytes.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;

use prost::Message as _;

impl v1::Frame {
    /// A frame with a request id and body.
    pub fn new(request_id: u64, body: v1::frame::Body) -> Self {
        Self {
            request_id,
            body: Some(body),
        }
    }

    /// Encodes the frame to its protobuf bytes (without a length prefix).
    pub fn to_bytes(&self) -> bytes::Bytes {
        self.encode_to_vec().into()
    }

    /// Decodes a frame from its protobuf bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        Self::decode(bytes)
    }

    /// An error answer to the request `request_id`.
    pub fn error(request_id: u64, code: v1::ErrorCode, message: impl Into<String>) -> Self {
        Self::new(
            request_id,
            v1::frame::Body::Error(v1::Error {
                code: code as i32,
                message: message.into(),
                retry_after_ms: 0,
            }),
        )
    }

    /// A close notice.
    pub fn close(reason: v1::CloseReason, message: impl Into<String>) -> Self {
        Self::new(
            0,
            v1::frame::Body::Close(v1::Close {
                reason: reason as i32,
                message: message.into(),
            }),
        )
    }
}
