//! Length-prefixed framing over byte streams: each frame is a 4-byte big-endian length, then that many bytes.
//!
//! [`FrameReader`] reads into its thread's scratch buffer, so one read takes whatever has
//! arrived (many frames, or one larger than a connection keeps). A frame that arrived whole
//! is copied out of the scratch buffer into a buffer of its own; only bytes not yet taken
//! (the frames after it, or a frame still arriving) are kept, in a heap buffer freed once
//! they are taken: a connection between frames holds no buffer at all.
//! [`FrameReader::poll_frame`] keeps all its state in the reader, so it can be polled next to
//! outbound traffic and timers without a future of its own, and dropping a read loses nothing.

use std::cell::RefCell;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, ReadBuf};

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Size of each thread's scratch buffer, the most one read takes.
const SCRATCH_BYTES: usize = 64 * 1024;

thread_local! {
    /// Where the readers on this thread read to: each moves what it read out before its
    /// poll returns, so one buffer serves every connection.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
}

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

/// Incremental reader of length-prefixed frames; its state between reads is one (usually
/// empty) buffer.
pub struct FrameReader {
    /// Bytes read and not yet taken, `held[start..]`; no allocation while empty.
    held: Vec<u8>,
    /// At most the scratch buffer's size plus a frame's, so it fits 32 bits.
    start: u32,
    max_frame_bytes: u32,
}

/// What one read brought.
enum Read {
    /// A frame that arrived whole (anything after it is kept).
    Frame(Bytes),
    /// Bytes kept for later frames.
    Kept,
    /// The end of the stream.
    End,
}

impl FrameReader {
    /// A reader refusing frames longer than `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self {
            held: Vec::new(),
            start: 0,
            // A frame's length prefix is 32 bits: no frame is longer anyway.
            max_frame_bytes: u32::try_from(max_frame_bytes).unwrap_or(u32::MAX),
        }
    }

    /// Whether no bytes are held (nothing of a frame still arriving).
    pub fn holds_nothing(&self) -> bool {
        self.held().is_empty()
    }

    /// The bytes read and not yet taken.
    fn held(&self) -> &[u8] {
        &self.held[self.start as usize..]
    }

    /// Reads the next frame. `Ok(None)` means the stream ended cleanly between frames.
    ///
    /// Cancel-safe: if the future is dropped, no bytes are lost; the next call resumes.
    pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        stream: &mut R,
    ) -> Result<Option<Bytes>, FrameError> {
        std::future::poll_fn(|cx| self.poll_frame(stream, cx)).await
    }

    /// Polls for the next frame, [`Self::read_frame`] without a future: all its state is
    /// in the reader. `Ok(None)` means the stream ended cleanly between frames.
    pub fn poll_frame<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        stream: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, FrameError>> {
        loop {
            if let Some(frame) = self.take_held_frame()? {
                return Poll::Ready(Ok(Some(frame)));
            }
            match ready!(self.poll_read_once(stream, cx))? {
                Read::Frame(frame) => return Poll::Ready(Ok(Some(frame))),
                Read::Kept => {}
                Read::End if self.held().is_empty() => return Poll::Ready(Ok(None)),
                Read::End => return Poll::Ready(Err(FrameError::Truncated)),
            }
        }
    }

    /// The length (prefix included) of the frame starting `bytes`, once its prefix is
    /// there; refuses a frame longer than allowed as soon as its prefix is read.
    fn frame_len(&self, bytes: &[u8]) -> Result<Option<usize>, FrameError> {
        let Some(prefix) = bytes.first_chunk::<LENGTH_PREFIX_BYTES>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix);
        if len > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                len: len as usize,
                max: self.max_frame_bytes as usize,
            });
        }
        Ok(Some(LENGTH_PREFIX_BYTES + len as usize))
    }

    /// Reads once into the thread's scratch buffer. With nothing held, a frame that came
    /// whole is copied out at once and only what follows it is kept. The buffer is
    /// borrowed while `stream` is polled: a stream whose reads poll another `FrameReader`
    /// on the same thread would find it taken (and panic); none here does.
    fn poll_read_once<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        stream: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Read, FrameError>> {
        SCRATCH.with_borrow_mut(|scratch| {
            let mut buf = ReadBuf::new(scratch);
            ready!(Pin::new(stream).poll_read(cx, &mut buf))?;
            let read = buf.filled();
            if read.is_empty() {
                return Poll::Ready(Ok(Read::End));
            }
            if !self.held().is_empty() {
                self.held.drain(..self.start as usize);
                self.start = 0;
                self.held.extend_from_slice(read);
                return Poll::Ready(Ok(Read::Kept));
            }
            let whole = self.frame_len(read)?;
            match whole {
                Some(whole) if whole <= read.len() => {
                    let frame = Bytes::copy_from_slice(&read[LENGTH_PREFIX_BYTES..whole]);
                    if whole < read.len() {
                        self.held = read[whole..].to_vec();
                        self.start = 0;
                    }
                    Poll::Ready(Ok(Read::Frame(frame)))
                }
                // The start of a frame: room for all of it now, not a regrowth per read.
                _ => {
                    let mut held = Vec::with_capacity(whole.unwrap_or(0).max(read.len()));
                    held.extend_from_slice(read);
                    self.held = held;
                    self.start = 0;
                    Poll::Ready(Ok(Read::Kept))
                }
            }
        })
    }

    /// Returns a complete frame if one is held. Once every byte is taken the buffer is
    /// freed: a connection between frames holds none.
    fn take_held_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        let held = self.held();
        let Some(whole) = self.frame_len(held)? else {
            return Ok(None);
        };
        if held.len() < whole {
            // The rest of the frame is appended read by read: room for all of it now.
            let missing = whole - held.len();
            self.held.reserve(missing);
            return Ok(None);
        }
        if self.start == 0 && held.len() == whole && self.held.capacity() <= whole + whole / 4 {
            // A buffer that holds just this frame (a large one, read by several reads) is
            // handed out as it is, not copied. Not one with more room: the frame's parts
            // (a message body) may outlive it and would keep all of it.
            let held = std::mem::take(&mut self.held);
            return Ok(Some(Bytes::from(held).slice(LENGTH_PREFIX_BYTES..whole)));
        }
        let frame = Bytes::copy_from_slice(&held[LENGTH_PREFIX_BYTES..whole]);
        self.start += whole as u32;
        if self.start as usize == self.held.len() {
            self.held = Vec::new();
            self.start = 0;
        }
        Ok(Some(frame))
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

    /// An AsyncRead that hands out its data in fixed chunk sizes, to exercise partial reads,
    /// and counts the reads it answers.
    struct Chunked {
        data: Vec<u8>,
        pos: usize,
        chunk: usize,
        reads: usize,
    }

    impl Chunked {
        fn new(data: Vec<u8>, chunk: usize) -> Self {
            Self {
                data,
                pos: 0,
                chunk,
                reads: 0,
            }
        }
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.reads += 1;
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

    /// Reads every frame of `wire`, handed out in reads of at most `chunk` bytes, with
    /// frames up to `max` bytes; returns the frames (or the first error), the reads it took
    /// and the reader.
    async fn read_frames(
        wire: Vec<u8>,
        chunk: usize,
        max: usize,
    ) -> (Result<Vec<Bytes>, FrameError>, usize, FrameReader) {
        let mut stream = Chunked::new(wire, chunk);
        let mut reader = FrameReader::new(max);
        let mut frames = Vec::new();
        let result = loop {
            match reader.read_frame(&mut stream).await {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break Ok(frames),
                Err(err) => break Err(err),
            }
        };
        (result, stream.reads, reader)
    }

    /// [`read_frames`] on a runtime of its own, for synchronous tests.
    fn read_all(data: Vec<u8>, chunk: usize, max: usize) -> Result<Vec<Vec<u8>>, FrameError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (frames, _, _) = rt.block_on(read_frames(data, chunk, max));
        Ok(frames?.iter().map(|f| f.to_vec()).collect())
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

    #[tokio::test]
    async fn what_has_arrived_is_taken_with_one_read_and_only_small_leftovers_are_kept() {
        // A backlog of small frames, and one frame larger than a connection keeps inline.
        let mut wire = Vec::new();
        for n in 0..64u8 {
            put_frame(&mut wire, &[n; 150]);
        }
        put_frame(&mut wire, &[9; 1000]);
        let (frames, reads, reader) = read_frames(wire, usize::MAX, 1 << 20).await;
        let frames = frames.unwrap();
        assert_eq!(frames.len(), 65);
        assert!(
            frames[..64]
                .iter()
                .enumerate()
                .all(|(n, f)| f[..] == [n as u8; 150])
        );
        assert_eq!(&frames[64][..], &[9; 1000][..]);
        // One read for all of it, one for the end of the stream.
        assert_eq!(reads, 2);
        assert_eq!(reader.held.capacity(), 0, "nothing left to keep");

        // Read by read, as it trickles in: the same frames.
        let mut wire = Vec::new();
        put_frame(&mut wire, &[1; 300]);
        put_frame(&mut wire, &[2; 10]);
        let (frames, _, reader) = read_frames(wire, 7, 1 << 20).await;
        let frames = frames.unwrap();
        assert_eq!(frames.len(), 2);
        assert_eq!(
            (&frames[0][..], &frames[1][..]),
            (&[1; 300][..], &[2; 10][..])
        );
        assert_eq!(reader.held.capacity(), 0);
    }

    #[tokio::test]
    async fn only_the_bytes_after_a_whole_frame_are_kept_and_freed_once_taken() {
        let mut wire = Vec::new();
        put_frame(&mut wire, &[5; 1000]);
        put_frame(&mut wire, &[6; 100]);
        // One read brings the large frame and the first 10 bytes of the next one.
        let first_read = 4 + 1000 + 10;
        let mut stream = Chunked::new(wire, first_read);
        let mut reader = FrameReader::new(4096);
        let frame = reader.read_frame(&mut stream).await.unwrap().unwrap();
        assert_eq!(&frame[..], &[5; 1000][..]);
        assert_eq!(reader.held(), &[0, 0, 0, 100, 6, 6, 6, 6, 6, 6][..]);
        assert!(reader.held.capacity() < 100, "the large frame is not kept");
        let frame = reader.read_frame(&mut stream).await.unwrap().unwrap();
        assert_eq!(&frame[..], &[6; 100][..]);
        assert_eq!(reader.held.capacity(), 0, "nothing held between frames");
    }

    #[test]
    fn a_reader_between_frames_is_a_few_words() {
        // It sits in every idle connection's task: no inline buffer.
        assert!(std::mem::size_of::<FrameReader>() <= 32);
    }

    #[tokio::test]
    async fn a_read_abandoned_mid_frame_loses_nothing() {
        let mut wire = Vec::new();
        put_frame(&mut wire, &[7; 700]);
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let mut reader = FrameReader::new(4096);
        // Half the frame arrives; the read is polled, then dropped (a select! that chose
        // another branch).
        tokio::io::AsyncWriteExt::write_all(&mut client, &wire[..350])
            .await
            .unwrap();
        {
            let mut read = std::pin::pin!(reader.read_frame(&mut server));
            let polled = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
            assert!(polled.is_pending(), "half a frame is not a frame");
        }
        tokio::io::AsyncWriteExt::write_all(&mut client, &wire[350..])
            .await
            .unwrap();
        let frame = reader.read_frame(&mut server).await.unwrap().unwrap();
        assert_eq!(&frame[..], &[7; 700][..]);
    }

    #[test]
    fn an_oversized_prefix_behind_a_large_frame_is_refused() {
        let mut wire = Vec::new();
        put_frame(&mut wire, &[1; 600]);
        wire.extend_from_slice(&(1_000_000u32).to_be_bytes());
        // Everything in one read: the second prefix is read from the spill buffer.
        let mut stream_frames = read_all(wire, usize::MAX, 1000);
        assert!(matches!(
            stream_frames.as_mut().unwrap_err(),
            FrameError::TooLarge { len: 1_000_000, .. }
        ));
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
