#!/usr/bin/env bash
# Builds every Wasm component: the first-party plugins (plugins/), the test plugins
# (tests/guest/) and the template (examples/plugin-template), into
# target/guest/wasm32-wasip2/release/*.wasm, and the Python test plugin into
# target/guest/python/.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 >/dev/null
(cd plugins && cargo build --release --locked)
(cd tests/guest && cargo build --release --locked)
(cd examples/plugin-template && cargo build --release --locked)
# A plugin in a second language: Python, packaged by componentize-py.
tests/guest-python/build.sh
