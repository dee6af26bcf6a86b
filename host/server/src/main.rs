//! The `im-server` binary.

fn main() -> std::process::ExitCode {
    im_server::cli::main()
}
