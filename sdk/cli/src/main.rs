//! The `imctl` binary.

fn main() -> std::process::ExitCode {
    imctl::main()
}
