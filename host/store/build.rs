//! Rebuilds the crate when a migration changes or is added: `sqlx::migrate!` embeds the
//! migration files at compile time, and on stable Rust cargo does not watch the directory.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
