#!/usr/bin/env bash
# Runs every check and test of the project on a fresh machine: formatting, lints, the
# plugin components, unit, conformance, runtime and end-to-end tests (which start real
# servers on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is required: install Rust from https://rustup.rs" >&2
    exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
rustup target add wasm32-wasip2 >/dev/null

# The host workspace and the guest (wasm32-wasip2) workspaces.
guests=(sdk/plugin plugins tests/guest examples/plugin-template)

echo "== format"
cargo fmt --all --check
for dir in "${guests[@]}"; do (cd "$dir" && cargo fmt --all --check); done

echo "== lint"
cargo clippy --locked --workspace --all-targets -- -D warnings
(cd sdk/plugin && cargo clippy --locked --all-features -- -D warnings)
for dir in plugins tests/guest examples/plugin-template; do (cd "$dir" && cargo clippy --locked --release -- -D warnings); done

echo "== plugin components"
./scripts/build-plugins.sh
# Guest unit tests run natively (they exercise plugin logic, not the Wasm imports).
host_target="$(rustc -vV | sed -n 's/^host: //p')"
for dir in plugins examples/plugin-template; do (cd "$dir" && cargo test --locked --lib --target "$host_target"); done

echo "== tests"
cargo test --locked --workspace
