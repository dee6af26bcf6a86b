//! Length-prefixed framing over byte streams: each frame is a 4-byte big-endian length, then that many bytes.
//!
//! [`FrameReader`] holds only a small inline buffer while a connection is idle (no heap
//! allocation), takes a larger one while frames arrive faster than it reads them (so one
//! read takes many), and allocates exactly one buffer of the announced size for a frame that
//! fits in neither. Its [`FrameReader::read_frame`] is cancel-safe, so it can sit in a
//! `tokio::select!` next to outbound traffic and timers.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Size of the inline buffer: small frames (acks, pings, short messages) are read
/// several at a time with one `read` call and need no allocation.
const INLINE_BYTES: usize = 256;

/// Size of the buffer a reader takes while a backlog lasts: one read takes a window of
/// frames (64 sends of a few hundred bytes) where the inline buffer took one or two.
const BURST_BYTES: usize = 16 * 1024;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame larger than allowed.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The underlying stream failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Incremental, cancel-safe reader of length-prefixed frames.
pub struct FrameReader {
    max_frame_bytes: usize,
    inline: [u8; INLINE_BYTES],
    /// While a backlog lasts (a read filled the whole buffer, so more was waiting), reads go
    /// here instead of `inline` until it is drained after a read that did not fill it. Its
    /// length is `end`: it is read into without being zeroed first.
    burst: Option<Vec<u8>>,
    /// The buffered bytes, in `burst` when there is one, else in `inline`.
    start: usize,
    end: usize,
    /// The last read left room in the buffer: the backlog is gone.
    caught_up: bool,
    /// A frame too large for the buffer, being filled: (buffer, bytes filled).
    large: Option<(Vec<u8>, usize)>,
}

impl FrameReader {
    /// A reader refusing frames longer than `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self {
            max_frame_bytes,
            inline: [0; INLINE_BYTES],
            burst: None,
            start: 0,
            end: 0,
            caught_up: true,
            large: None,
        }
    }

    /// The buffered bytes (and, inline, the room after them).
    fn buffer(&mut self) -> &mut [u8] {
        match &mut self.burst {
            Some(burst) => burst,
            None => &mut self.inline,
        }
    }

    /// The most the buffer holds.
    fn capacity(&self) -> usize {
        match &self.burst {
            Some(burst) => burst.capacity(),
            None => INLINE_BYTES,
        }
    }

    /// Reads once into the room after the buffered bytes; returns the bytes read and the
    /// room there was.
    async fn read_more<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        stream: &mut R,
    ) -> std::io::Result<(usize, usize)> {
        let room = self.capacity() - self.end;
        let n = match &mut self.burst {
            // `read_buf` fills the spare capacity, which `room` bytes of it are.
            Some(burst) => stream.read_buf(burst).await?,
            None => stream.read(&mut self.inline[self.end..]).await?,
        };
        Ok((n, room))
    }

    /// Reads the next frame. `Ok(None)` means the stream ended cleanly between frames.
    ///
    /// Cancel-safe: if the future is dropped, no bytes are lost; the next call resumes.
    pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        stream: &mut R,
    ) -> Result<Option<Bytes>, FrameError> {
        loop {
            if let Some(frame) = self.take_buffered_frame()? {
                return Ok(Some(frame));
            }
            if let Some((buf, filled)) = &mut self.large {
                let n = stream.read(&mut buf[*filled..]).await?;
                if n == 0 {
                    return Err(FrameError::Truncated);
                }
                *filled += n;
                continue;
            }
            let (start, end) = (self.start, self.end);
            if start > 0 {
                self.buffer().copy_within(start..end, 0);
                if let Some(burst) = &mut self.burst {
                    burst.truncate(end - start);
                }
                self.end -= start;
                self.start = 0;
            }
            let (n, room) = self.read_more(stream).await?;
            if n == 0 {
                return if self.end == 0 {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
            self.end += n;
            self.caught_up = n < room;
            if !self.caught_up && self.burst.is_none() {
                let mut burst = Vec::with_capacity(BURST_BYTES);
                burst.extend_from_slice(&self.inline[..self.end]);
                self.burst = Some(burst);
            }
        }
    }

    /// Returns a complete frame if one is buffered; moves a started large frame out of the
    /// buffer; gives the burst buffer back once it is drained and the backlog is gone.
    fn take_buffered_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        if let Some((buf, filled)) = &self.large {
            if *filled < buf.len() {
                return Ok(None);
            }
            let (buf, _) = self.large.take().expect("checked above");
            return Ok(Some(Bytes::from(buf)));
        }
        let available = self.end - self.start;
        if available < LENGTH_PREFIX_BYTES {
            if available == 0 && self.caught_up {
                self.burst = None;
            }
            return Ok(None);
        }
        let (start, end) = (self.start, self.end);
        let max_frame_bytes = self.max_frame_bytes;
        let capacity = self.capacity();
        let buffer = self.buffer();
        let prefix: [u8; 4] = buffer[start..start + 4].try_into().expect("four bytes");
        let len = u32::from_be_bytes(prefix) as usize;
        if len > max_frame_bytes {
            return Err(FrameError::TooLarge {
                len,
                max: max_frame_bytes,
            });
        }
        let body_start = start + LENGTH_PREFIX_BYTES;
        let buffered_body = available - LENGTH_PREFIX_BYTES;
        if buffered_body >= len {
            let frame = Bytes::copy_from_slice(&buffer[body_start..body_start + len]);
            self.start = body_start + len;
            if self.start == self.end {
                self.clear();
            }
            return Ok(Some(frame));
        }
        if LENGTH_PREFIX_BYTES + len > capacity {
            let mut buf = vec![0u8; len];
            buf[..buffered_body].copy_from_slice(&buffer[body_start..end]);
            self.large = Some((buf, buffered_body));
            self.clear();
        }
        Ok(None)
    }

    /// Forgets the buffered bytes (all taken).
    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
        if let Some(burst) = &mut self.burst {
            burst.clear();
        }
    }
}

/// Appends `payload` with its length prefix to `out`.
pub fn put_frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Appends the protobuf encoding of `message` with its length prefix to `out`.
pub fn put_message(out: &mut Vec<u8>, message: &impl prost::Message) {
    let len = message.encoded_len();
    out.reserve(LENGTH_PREFIX_BYTES + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    message.encode_raw(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::ReadBuf;

    /// An AsyncRead that hands out its data in fixed chunk sizes, to exercise partial reads.
    struct Chunked {
        data: Vec<u8>,
        pos: usize,
        chunk: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let n = self
                .chunk
                .min(buf.remaining())
                .min(self.data.len() - self.pos);
            let pos = self.pos;
            buf.put_slice(&self.data[pos..pos + n]);
            self.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    fn read_all(data: Vec<u8>, chunk: usize, max: usize) -> Result<Vec<Vec<u8>>, FrameError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut stream = Chunked {
                data,
                pos: 0,
                chunk,
            };
            let mut reader = FrameReader::new(max);
            let mut frames = Vec::new();
            while let Some(frame) = reader.read_frame(&mut stream).await? {
                frames.push(frame.to_vec());
            }
            Ok(frames)
        })
    }

    proptest! {
        #[test]
        fn frames_round_trip_whatever_the_chunking(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..2000), 0..20),
            chunk in 1usize..600,
        ) {
            let mut wire = Vec::new();
            for p in &payloads {
                put_frame(&mut wire, p);
            }
            let frames = read_all(wire, chunk, 4096).unwrap();
            prop_assert_eq!(frames, payloads);
        }
    }

    /// A stream that counts the reads it answers.
    struct Counting {
        inner: Chunked,
        reads: usize,
    }

    impl AsyncRead for Counting {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.reads += 1;
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    #[tokio::test]
    async fn a_backlog_is_read_many_frames_at_a_time_and_the_large_buffer_given_back() {
        let mut wire = Vec::new();
        for n in 0..64u8 {
            put_frame(&mut wire, &[n; 150]);
        }
        let backlog = wire.len();
        // The whole backlog is waiting: each read takes as much as the buffer holds.
        let mut stream = Counting {
            inner: Chunked {
                data: wire,
                pos: 0,
                chunk: usize::MAX,
            },
            reads: 0,
        };
        let mut reader = FrameReader::new(4096);
        for n in 0..64u8 {
            let frame = reader.read_frame(&mut stream).await.unwrap().unwrap();
            assert_eq!(&frame[..], &[n; 150][..]);
        }
        let inline_reads = backlog.div_ceil(INLINE_BYTES);
        assert!(
            stream.reads <= 3,
            "{} reads for {backlog} bytes (the inline buffer alone would take {inline_reads})",
            stream.reads
        );
        assert!(reader.burst.is_some(), "no read has come up short yet");
        // A read that comes up short ends the backlog; drained, the reader holds only its
        // inline buffer again.
        assert!(reader.read_frame(&mut stream).await.unwrap().is_none());
        assert!(reader.burst.is_none());
    }

    #[test]
    fn oversized_frame_is_refused_before_reading_its_body() {
        let mut wire = Vec::new();
        put_frame(&mut wire, &[7u8; 100]);
        wire.extend_from_slice(&(1_000_000u32).to_be_bytes());
        let err = read_all(wire, 64, 1000).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::TooLarge {
                    len: 1_000_000,
                    max: 1000
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn stream_ending_mid_frame_is_truncated() {
        let mut wire = Vec::new();
        put_frame(&mut wire, &[1u8; 600]);
        wire.truncate(300);
        assert!(matches!(
            read_all(wire, 50, 4096),
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read_all(vec![0, 0], 50, 4096),
            Err(FrameError::Truncated)
        ));
    }
}
