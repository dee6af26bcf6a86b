#!/usr/bin/env bash
# The benchmark kit's one command: builds the release server, the plugins and the load
# generator, installs the peers (mosquitto, nats-server) from Debian's packages, runs every
# scenario and renders results.json, results.md and PNG plots into the output directory.
#
#   ./scripts/bench.sh                 # full run (about 40 minutes)
#   ./scripts/bench.sh --quick         # quick mode (under 10 minutes; about 9 here)
#   ./scripts/bench.sh --quick --only rtt,fanout --no-peers
#
# Environment: BENCH_OUT (default target/bench); HALT_POLL_NS: on a KVM guest whose idle
# driver is haltpoll, how long an idle vCPU polls before halting during the run (root only;
# the previous value is restored on exit). The results record the value in force.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${BENCH_OUT:-target/bench}"
rustup target add wasm32-wasip2 >/dev/null
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ] || ! command -v nats-server >/dev/null 2>&1; then
    echo "== installing mosquitto and nats-server"
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    $sudo_cmd apt-get install -y -qq mosquitto nats-server >/dev/null
fi
# The Debian service would hold port 1883; the kit starts its own instances.
(systemctl stop mosquitto 2>/dev/null || service mosquitto stop 2>/dev/null || true) >/dev/null 2>&1
python3 -c "import matplotlib" 2>/dev/null || python3 -m pip install --quiet matplotlib
echo "== building"
(cd plugins && cargo build --release --locked)
(cd tests/guest && cargo build --release --locked)   # hook_bench's no-op filter
cargo build --release --locked -p im-server -p im-bench
cargo build --release --locked -p im-plugins --example hook_bench
mkdir -p "$out"
halt_poll=/sys/module/haltpoll/parameters/guest_halt_poll_ns
if [ -n "${HALT_POLL_NS:-}" ]; then
    [ -w "$halt_poll" ] || { echo "HALT_POLL_NS needs root and the haltpoll idle driver ($halt_poll)" >&2; exit 2; }
    previous_halt_poll="$(cat "$halt_poll")"
    trap 'echo "$previous_halt_poll" > "$halt_poll"' EXIT
    echo "$HALT_POLL_NS" > "$halt_poll"
fi
echo "== running (results in $out)"
./target/release/im-bench all --out "$out" "$@"
# The round trip once more with every server on cpu 0 and the load generator on cpu 1, as
# clients on other machines would be: left to the kernel, a single-threaded server shares
# the load generator's cpu and a multi-threaded one mostly does not, and that placement
# moves a round trip's p50 by a factor of two here (docs/benchmarks.md). Skipped when the
# run has no round trip, is pinned already, or the machine has one cpu.
only="" pinned="" apart_args=() skip_next=""
for arg in "$@"; do
    if [ -n "$skip_next" ]; then
        [ "$skip_next" = only ] && only="$arg"
        skip_next=""
        continue
    fi
    case "$arg" in
        --only) skip_next=only ;;
        --only=*) only="${arg#--only=}" ;;
        --pin|--pin=*) pinned=1; apart_args+=("$arg") ;;
        *) apart_args+=("$arg") ;;
    esac
done
# The plugin hooks' own cost, read against the per-hook target: each case back to back, then
# after an idle millisecond (as between two messages of a lightly loaded server).
if [ -z "$only" ] || [[ ",$only," == *,plugins,* ]]; then
    echo "== plugin hook calls (results in $out/hooks.json, $out/hooks-cold.json)"
    HOOK_BENCH_JSON="$out/hooks.json" ./target/release/examples/hook_bench 200000
    HOOK_BENCH_JSON="$out/hooks-cold.json" HOOK_BENCH_IDLE_US=1000 ./target/release/examples/hook_bench 20000
fi
if [ -z "$pinned" ] && [ "$(nproc)" -ge 2 ] && { [ -z "$only" ] || [[ ",$only," == *,rtt,* ]]; }; then
    echo "== round trip pinned apart (results in $out/apart)"
    ./target/release/im-bench all --out "$out/apart" --only rtt --pin 0:1 "${apart_args[@]}"
fi
python3 scripts/bench-report.py "$out"
echo "== wrote $out/results.json, $out/results.md and $out/*.png"
