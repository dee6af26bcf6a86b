//! The server binary, built inside the test package so tests can start and kill it as a process.

fn main() -> std::process::ExitCode {
    im_server::cli::main()
}
