#!/usr/bin/env bash
# Starts one IM node on the embedded default (SQLite, in-process routing) with the first-party
# plugins, data in ./data. Extra arguments go to im-server (see `im-server --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is required: install Rust from https://rustup.rs" >&2
    exit 1
fi
rustup target add wasm32-wasip2 >/dev/null
(cd plugins && cargo build --release --locked)
cargo build --release --locked -p im-server -p imctl
cat <<'HINT'
Chat from two more terminals:
  ./target/release/imctl chat --user alice --with bob
  ./target/release/imctl chat --user bob --with alice
Manage plugins:
  ./target/release/imctl plugin list
HINT
exec ./target/release/im-server --config examples/server.toml "$@"
