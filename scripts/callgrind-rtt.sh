#!/usr/bin/env bash
# Instructions per message of a server build, counted by callgrind (repeatable where
# timings on a shared 2-core machine are not): runs the kit's round trip with plugins on
# at 300 round trips/s (two rounds of 10 s) under valgrind, dumps the counters every 4 s,
# and prints, for each window that carried traffic and for all of them together, the
# instructions, allocations, String clones and SipHash writes per message (a message: one
# push encoded: `pipeline::to_proto`, since 2026-12-07 `encode::deliver_frame`). The
# window's instructions per message vary with what else fell into it (a WAL checkpoint, a
# login, idle wake-ups); the message path's (the inclusive instructions of a frame's
# handling, the commit, the answers and the applier) are the figure to compare builds by.
#
#   ./scripts/callgrind-rtt.sh [SERVER_BINARY]     # default target/release/im-server
#
# Needs valgrind and a release build of im-bench and the plugins (scripts/bench.sh builds
# them).
set -euo pipefail
cd "$(dirname "$0")/.."
server="$(realpath "${1:-target/release/im-server}")"
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
# CALLGRIND_OUT keeps the dumps (for callgrind_annotate) in that directory.
if [ -n "${CALLGRIND_OUT:-}" ]; then
    work="$(realpath -m "$CALLGRIND_OUT")"
    mkdir -p "$work"
    rm -f "$work"/cg.*
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
fi
cat > "$work/server" <<EOW
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$work/cg.%p --dump-instr=no --collect-jumps=no "$server" "\$@"
EOW
chmod +x "$work/server"
./target/release/im-bench all --out "$work/bench" --only rtt --no-peers --repeat 2 \
    --rtt-configs on --rtt-rates 300 --server-bin "$work/server" > "$work/bench.log" 2>&1 &
bench=$!
sleep 3
while kill -0 "$bench" 2>/dev/null; do
    sleep 4
    pid="$(pgrep -f "callgrind-out-file=$work" | head -1 || true)"
    [ -n "$pid" ] && callgrind_control -d "$pid" >/dev/null 2>&1 || true
done
python3 scripts/callgrind-per-message.py "$work"/cg.*.*
