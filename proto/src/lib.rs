//! The im.v1 client protocol: generated message types, the length-prefixed frame codec and identifier rules.
//!
//! Layout:
//! - [`v1`]: prost types generated from `proto/im/v1/im.proto` (the source of truth);
//! - [`codec`]: 4-byte big-endian length-prefixed framing for byte streams (TCP, TLS, QUIC);
//! - [`encode`]: the per-message pushes and acks encoded from borrowed fields;
//! - [`ids`]: validation of user/device ids and 1:1 conversation ids.

pub mod codec;
pub mod encode;
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

    /// Decodes a frame whose `bytes` fields (message bodies) share `frame`'s buffer instead
    /// of being copied out of it: the buffer lives as long as any of them.
    pub fn from_shared(frame: bytes::Bytes) -> Result<Self, prost::DecodeError> {
        Self::decode(frame)
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

#[cfg(test)]
mod tests {
    use super::v1;

    #[test]
    fn a_frame_decoded_from_shared_bytes_lends_its_body_without_a_copy() {
        let body = bytes::Bytes::from_static(b"a body long enough to matter");
        let send = v1::SendRequest {
            client_msg_id: "c1".into(),
            body: body.clone(),
            content_type: "text/plain".into(),
            target: Some(v1::send_request::Target::ToUser("bob".into())),
        };
        let wire = v1::Frame::new(7, v1::frame::Body::Send(send.clone())).to_bytes();
        let decoded = v1::Frame::from_shared(wire.clone()).unwrap();
        assert_eq!(decoded, v1::Frame::from_bytes(&wire).unwrap());
        let Some(v1::frame::Body::Send(decoded)) = decoded.body else {
            panic!("not a send")
        };
        assert_eq!(decoded, send);
        let within = wire.as_ptr_range();
        assert!(
            within.contains(&decoded.body.as_ptr()),
            "the body was copied out of the frame"
        );
    }
}
