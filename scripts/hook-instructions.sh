#!/usr/bin/env bash
# Instructions per plugin hook call, counted by callgrind over hook_bench: repeatable where
# timings on a shared machine are not. Prints one line per case: the no-op message filter
# (two handles lent), the no-op body screen (none), the keyword filter on 100 bytes, and
# risk control's send check (the host's key-value work around the call included).
#
#   ./scripts/hook-instructions.sh [CALLS]      # default 5000 (plus hook_bench's warm-up)
#
# Needs valgrind and the plugin components (scripts/build-plugins.sh); builds hook_bench.
set -euo pipefail
cd "$(dirname "$0")/.."
calls="${1:-5000}"
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
cargo build --release --locked -p im-plugins --example hook_bench >&2
bench="$(pwd)/target/release/examples/hook_bench"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# case label | hook_bench filter | function whose inclusive cost is counted | calls counted
count() {
    local label="$1" only="$2" collect="$3" counted="$4"
    valgrind --tool=callgrind --callgrind-out-file="$work/cg" --toggle-collect="$collect" \
        "$bench" "$calls" "$only" >/dev/null 2>"$work/log"
    local total
    total="$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$work/log")"
    echo "$label: $((total / counted)) instructions a call"
}
# A filter case measures its calls and the warm-up (a fifth as many again); the risk case
# counts its checks alone.
filter_calls=$((calls + calls / 5))
count "no-op filter, 100 B" "no-op filter 100 B" '*call_direct*' "$filter_calls"
count "no-op screen, 100 B" "no-op screen" '*call_direct*' "$filter_calls"
count "keyword filter, 100 B" "keyword filter 100 B" '*call_direct*' "$filter_calls"
count "risk control's send check" "risk" '*measure_risk*' "$calls"
