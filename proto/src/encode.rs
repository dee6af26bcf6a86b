//! Server-sent frames encoded straight from borrowed fields: the pushes and acks sent for
//! every stored message, without building (and allocating) the prost structs first. The
//! bytes are exactly prost's for the same values (the tests compare them).

use bytes::{BufMut, Bytes};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

/// `Frame.deliver`'s field number.
const FRAME_DELIVER: u32 = 33;
/// `Frame.send_ack`'s field number.
const FRAME_SEND_ACK: u32 = 32;
/// `Frame.request_id`'s field number.
const FRAME_REQUEST_ID: u32 = 1;

/// A message's fields, borrowed: encodes as `v1::Message`.
#[derive(Clone, Copy, Debug)]
pub struct MessageFields<'a> {
    pub conversation_id: &'a str,
    pub seq: u64,
    pub server_msg_id: &'a str,
    pub sender_id: &'a str,
    pub sender_device_id: &'a str,
    pub recipient_id: &'a str,
    pub client_msg_id: &'a str,
    pub body: &'a [u8],
    pub content_type: &'a str,
    pub server_time_ms: i64,
}

/// A send's acknowledgement, borrowed: encodes as `v1::SendAck`.
#[derive(Clone, Copy, Debug)]
pub struct SendAckFields<'a> {
    pub client_msg_id: &'a str,
    pub conversation_id: &'a str,
    pub seq: u64,
    pub server_msg_id: &'a str,
    pub server_time_ms: i64,
    pub duplicate: bool,
    pub dropped: bool,
}

/// One field of a message being encoded; proto3 leaves default values out.
enum Field<'a> {
    Bytes(u32, &'a [u8]),
    Varint(u32, u64),
}

impl Field<'_> {
    fn encoded_len(&self) -> usize {
        match *self {
            Field::Bytes(_, []) => 0,
            Field::Bytes(tag, b) => key_len(tag) + encoded_len_varint(b.len() as u64) + b.len(),
            Field::Varint(_, 0) => 0,
            Field::Varint(tag, v) => key_len(tag) + encoded_len_varint(v),
        }
    }

    fn encode(&self, buf: &mut impl BufMut) {
        match *self {
            Field::Bytes(_, []) => {}
            Field::Bytes(tag, b) => {
                encode_key(tag, WireType::LengthDelimited, buf);
                encode_varint(b.len() as u64, buf);
                buf.put_slice(b);
            }
            Field::Varint(_, 0) => {}
            Field::Varint(tag, v) => {
                encode_key(tag, WireType::Varint, buf);
                encode_varint(v, buf);
            }
        }
    }
}

/// A nested message: its fields, encoded after a key and a length.
fn nested_len(tag: u32, inner: usize) -> usize {
    key_len(tag) + encoded_len_varint(inner as u64) + inner
}

fn put_nested(tag: u32, inner: usize, buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(inner as u64, buf);
}

impl MessageFields<'_> {
    fn fields(&self) -> [Field<'_>; 10] {
        [
            Field::Bytes(1, self.conversation_id.as_bytes()),
            Field::Varint(2, self.seq),
            Field::Bytes(3, self.server_msg_id.as_bytes()),
            Field::Bytes(4, self.sender_id.as_bytes()),
            Field::Bytes(5, self.sender_device_id.as_bytes()),
            Field::Bytes(6, self.recipient_id.as_bytes()),
            Field::Bytes(7, self.client_msg_id.as_bytes()),
            Field::Bytes(8, self.body),
            Field::Bytes(9, self.content_type.as_bytes()),
            // int64 is a varint of the two's complement, as prost writes it.
            Field::Varint(10, self.server_time_ms as u64),
        ]
    }
}

impl SendAckFields<'_> {
    fn fields(&self) -> [Field<'_>; 7] {
        [
            Field::Bytes(1, self.client_msg_id.as_bytes()),
            Field::Bytes(2, self.conversation_id.as_bytes()),
            Field::Varint(3, self.seq),
            Field::Bytes(4, self.server_msg_id.as_bytes()),
            Field::Varint(5, self.server_time_ms as u64),
            Field::Varint(6, u64::from(self.duplicate)),
            Field::Varint(7, u64::from(self.dropped)),
        ]
    }
}

fn fields_len(fields: &[Field<'_>]) -> usize {
    fields.iter().map(Field::encoded_len).sum()
}

/// A frame `{request_id, body: <body_tag> {fields...}}` whose body may nest once more
/// (`nest`: the body's own field holding `fields`).
fn frame(request_id: u64, body_tag: u32, nest: Option<u32>, fields: &[Field<'_>]) -> Bytes {
    let inner = fields_len(fields);
    let body = match nest {
        Some(tag) => nested_len(tag, inner),
        None => inner,
    };
    let request = Field::Varint(FRAME_REQUEST_ID, request_id);
    let total = request.encoded_len() + nested_len(body_tag, body);
    let mut buf = Vec::with_capacity(total);
    request.encode(&mut buf);
    put_nested(body_tag, body, &mut buf);
    if let Some(tag) = nest {
        put_nested(tag, inner, &mut buf);
    }
    for field in fields {
        field.encode(&mut buf);
    }
    debug_assert_eq!(buf.len(), total);
    buf.into()
}

/// The push of a stored message: `Frame {request_id: 0, deliver: {message}}`.
pub fn deliver_frame(message: &MessageFields<'_>) -> Bytes {
    frame(0, FRAME_DELIVER, Some(1), &message.fields())
}

/// A send's acknowledgement: `Frame {request_id, send_ack}`.
pub fn send_ack_frame(request_id: u64, ack: &SendAckFields<'_>) -> Bytes {
    frame(request_id, FRAME_SEND_ACK, None, &ack.fields())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1;

    // The tests' mapping; the server encodes from its stored messages instead.
    impl<'a> From<&'a v1::Message> for MessageFields<'a> {
        fn from(m: &'a v1::Message) -> Self {
            Self {
                conversation_id: &m.conversation_id,
                seq: m.seq,
                server_msg_id: &m.server_msg_id,
                sender_id: &m.sender_id,
                sender_device_id: &m.sender_device_id,
                recipient_id: &m.recipient_id,
                client_msg_id: &m.client_msg_id,
                body: &m.body,
                content_type: &m.content_type,
                server_time_ms: m.server_time_ms,
            }
        }
    }

    fn message(i: u64) -> v1::Message {
        v1::Message {
            conversation_id: format!("u:alice:bob{i}"),
            seq: i * 1_000_003,
            server_msg_id: "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into(),
            sender_id: "alice".into(),
            sender_device_id: if i.is_multiple_of(2) {
                "phone".into()
            } else {
                String::new()
            },
            recipient_id: "bob".into(),
            client_msg_id: format!("c{i}"),
            body: bytes::Bytes::from(vec![b'x'; (i * 37 % 300) as usize]),
            content_type: if i.is_multiple_of(3) {
                String::new()
            } else {
                "text/plain".into()
            },
            server_time_ms: match i % 4 {
                0 => 0,
                1 => -5,
                _ => 1_765_000_000_000 + i as i64,
            },
        }
    }

    #[test]
    fn a_deliver_frame_is_byte_for_byte_what_prost_writes() {
        for i in 0..40 {
            let m = message(i);
            let expected = v1::Frame::new(
                0,
                v1::frame::Body::Deliver(v1::Deliver {
                    message: Some(m.clone()),
                }),
            )
            .to_bytes();
            assert_eq!(deliver_frame(&(&m).into()), expected, "message {i}");
        }
    }

    #[test]
    fn a_send_ack_frame_is_byte_for_byte_what_prost_writes() {
        for i in 0..40u64 {
            let m = message(i);
            let ack = v1::SendAck {
                client_msg_id: m.client_msg_id.clone(),
                conversation_id: m.conversation_id.clone(),
                seq: m.seq,
                server_msg_id: m.server_msg_id.clone(),
                server_time_ms: m.server_time_ms,
                duplicate: i % 2 == 1,
                dropped: i % 5 == 0,
            };
            let request_id = [0, 1, 127, 128, u64::MAX][i as usize % 5];
            let expected =
                v1::Frame::new(request_id, v1::frame::Body::SendAck(ack.clone())).to_bytes();
            let borrowed = SendAckFields {
                client_msg_id: &ack.client_msg_id,
                conversation_id: &ack.conversation_id,
                seq: ack.seq,
                server_msg_id: &ack.server_msg_id,
                server_time_ms: ack.server_time_ms,
                duplicate: ack.duplicate,
                dropped: ack.dropped,
            };
            assert_eq!(send_ack_frame(request_id, &borrowed), expected, "ack {i}");
        }
    }
}
