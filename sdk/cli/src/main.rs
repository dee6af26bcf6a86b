//! The `imctl` binary.

fn main() -> anyhow::Result<()> {
    imctl::run()
}
