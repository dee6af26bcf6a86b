#!/usr/bin/env bash
# Starts one IM node on the embedded default (SQLite, in-process routing), data in ./data.
# Extra arguments go to im-server (see `im-server --help`), e.g. --config im.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is required: install Rust from https://rustup.rs" >&2
    exit 1
fi
cargo build --release --locked -p im-server -p imctl
echo "Mint a token and chat from another terminal, for example:"
echo "  ./target/release/imctl chat --user alice --with bob"
echo "  ./target/release/imctl chat --user bob --with alice"
exec ./target/release/im-server "$@"
