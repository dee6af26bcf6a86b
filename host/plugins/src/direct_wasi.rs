//! The WASI imports of direct plugins: the non-waiting interfaces as WASI defines them, and
//! `wasi:io` whose blocking functions finish only what is ready and trap otherwise.
//!
//! Why: wasmtime-wasi's synchronous `wasi:io` blocks on the tokio runtime, which panics on a
//! runtime thread, and its asynchronous one needs every call on a fiber. A plugin hook has
//! nothing to wait for (no files, sockets or clock sleeps are granted to it; its stdout and
//! stderr discard what they get and are always writable), so here a blocking call that
//! would have to wait is a trap: the call fails like any other guest fault and the server
//! thread never waits.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::cli::{WasiCli, WasiCliView};
use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
use wasmtime_wasi::p2::bindings::io::poll::HostPollable as AsyncPollable;
use wasmtime_wasi::p2::bindings::io::streams::{
    HostInputStream as AsyncInput, HostOutputStream as AsyncOutput,
};
use wasmtime_wasi::p2::bindings::sync::io::{poll, streams};
use wasmtime_wasi::p2::bindings::{cli, clocks, io, random};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable, StreamError, StreamResult};
use wasmtime_wasi::random::{WasiRandom, WasiRandomView};

/// Links the WASI interfaces a direct plugin may import. Filesystem and socket interfaces
/// are left out: a component importing them is called on a fiber with the full WASI.
pub fn add_to_linker<T: WasiView>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    let l = linker;
    clocks::wall_clock::add_to_linker::<T, WasiClocks>(l, T::clocks)?;
    clocks::monotonic_clock::add_to_linker::<T, WasiClocks>(l, T::clocks)?;
    random::random::add_to_linker::<T, WasiRandom>(l, |t| t.random())?;
    random::insecure::add_to_linker::<T, WasiRandom>(l, |t| t.random())?;
    random::insecure_seed::add_to_linker::<T, WasiRandom>(l, |t| t.random())?;
    cli::exit::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::environment::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stdin::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stdout::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stderr::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_input::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_output::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stdin::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stdout::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stderr::add_to_linker::<T, WasiCli>(l, T::cli)?;
    io::error::add_to_linker::<T, Table>(l, |t| t.ctx().table)?;
    poll::add_to_linker::<T, NoWait>(l, |t| NeverWaits(t.ctx().table))?;
    streams::add_to_linker::<T, NoWait>(l, |t| NeverWaits(t.ctx().table))?;
    Ok(())
}

struct Table;

impl HasData for Table {
    type Data<'a> = &'a mut ResourceTable;
}

struct NoWait;

impl HasData for NoWait {
    type Data<'a> = NeverWaits<'a>;
}

/// `wasi:io` over the store's resource table, finishing only what needs no waiting.
pub struct NeverWaits<'a>(&'a mut ResourceTable);

/// Polls `future` once: its output if it is ready now.
fn ready_now<F: Future>(future: F) -> Option<F::Output> {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

fn would_wait(what: &str) -> wasmtime::Error {
    wasmtime::format_err!("{what} would wait, and a plugin call may not wait")
}

fn stream_would_wait(what: &str) -> StreamError {
    StreamError::Trap(would_wait(what))
}

impl poll::Host for NeverWaits<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        ready_now(io::poll::Host::poll(self.0, pollables))
            .unwrap_or_else(|| Err(would_wait("poll")))
    }
}

impl poll::HostPollable for NeverWaits<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        ready_now(AsyncPollable::ready(self.0, pollable)).unwrap_or(Ok(false))
    }

    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        ready_now(AsyncPollable::block(self.0, pollable))
            .unwrap_or_else(|| Err(would_wait("pollable.block")))
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        AsyncPollable::drop(self.0, pollable)
    }
}

impl streams::Host for NeverWaits<'_> {
    fn convert_stream_error(&mut self, err: StreamError) -> wasmtime::Result<streams::StreamError> {
        Ok(
            match io::streams::Host::convert_stream_error(self.0, err)? {
                io::streams::StreamError::LastOperationFailed(e) => {
                    streams::StreamError::LastOperationFailed(e)
                }
                io::streams::StreamError::Closed => streams::StreamError::Closed,
            },
        )
    }
}

impl streams::HostOutputStream for NeverWaits<'_> {
    fn drop(&mut self, stream: Resource<DynOutputStream>) -> wasmtime::Result<()> {
        // A stream still flushing is dropped unflushed rather than waited for.
        ready_now(AsyncOutput::drop(self.0, stream)).unwrap_or(Ok(()))
    }

    fn check_write(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<u64> {
        AsyncOutput::check_write(self.0, stream)
    }

    fn write(&mut self, stream: Resource<DynOutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        AsyncOutput::write(self.0, stream, bytes)
    }

    fn blocking_write_and_flush(
        &mut self,
        stream: Resource<DynOutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        ready_now(AsyncOutput::blocking_write_and_flush(self.0, stream, bytes))
            .unwrap_or_else(|| Err(stream_would_wait("output-stream.blocking-write-and-flush")))
    }

    fn blocking_write_zeroes_and_flush(
        &mut self,
        stream: Resource<DynOutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        ready_now(AsyncOutput::blocking_write_zeroes_and_flush(
            self.0, stream, len,
        ))
        .unwrap_or_else(|| {
            Err(stream_would_wait(
                "output-stream.blocking-write-zeroes-and-flush",
            ))
        })
    }

    fn subscribe(
        &mut self,
        stream: Resource<DynOutputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        AsyncOutput::subscribe(self.0, stream)
    }

    fn write_zeroes(&mut self, stream: Resource<DynOutputStream>, len: u64) -> StreamResult<()> {
        AsyncOutput::write_zeroes(self.0, stream, len)
    }

    fn flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        AsyncOutput::flush(self.0, stream)
    }

    fn blocking_flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        ready_now(AsyncOutput::blocking_flush(self.0, stream))
            .unwrap_or_else(|| Err(stream_would_wait("output-stream.blocking-flush")))
    }

    fn splice(
        &mut self,
        dst: Resource<DynOutputStream>,
        src: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        AsyncOutput::splice(self.0, dst, src, len)
    }

    fn blocking_splice(
        &mut self,
        dst: Resource<DynOutputStream>,
        src: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        ready_now(AsyncOutput::blocking_splice(self.0, dst, src, len))
            .unwrap_or_else(|| Err(stream_would_wait("output-stream.blocking-splice")))
    }
}

impl streams::HostInputStream for NeverWaits<'_> {
    fn drop(&mut self, stream: Resource<DynInputStream>) -> wasmtime::Result<()> {
        ready_now(AsyncInput::drop(self.0, stream)).unwrap_or(Ok(()))
    }

    fn read(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<Vec<u8>> {
        AsyncInput::read(self.0, stream, len)
    }

    fn blocking_read(
        &mut self,
        stream: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<Vec<u8>> {
        ready_now(AsyncInput::blocking_read(self.0, stream, len))
            .unwrap_or_else(|| Err(stream_would_wait("input-stream.blocking-read")))
    }

    fn skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        AsyncInput::skip(self.0, stream, len)
    }

    fn blocking_skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        ready_now(AsyncInput::blocking_skip(self.0, stream, len))
            .unwrap_or_else(|| Err(stream_would_wait("input-stream.blocking-skip")))
    }

    fn subscribe(
        &mut self,
        stream: Resource<DynInputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        AsyncInput::subscribe(self.0, stream)
    }
}
