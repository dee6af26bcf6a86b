#!/usr/bin/env bash
# Builds the Python test plugin with componentize-py (from PyPI, installed into a virtual
# environment under target/) into target/guest/python/python_filter.wasm. It is built
# against the contract's previous version, 0.2.0, on purpose: the server must keep serving
# components built before 0.2.1 (tests/tests/plugins.rs runs it).
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=target/py
if [ ! -x "$venv/bin/componentize-py" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet componentize-py==0.25.1
fi
out=target/guest/python
mkdir -p "$out"
"$venv/bin/componentize-py" -d wit/im-plugin@0.2.0 -w filter-plugin componentize \
    -p tests/guest-python/python_filter app -o "$out/python_filter.wasm"
