#!/usr/bin/env python3
"""Renders a benchmark run (results.json from `im-bench all`) as results.md and PNG plots.

Usage: scripts/bench-report.py OUT_DIR
"""
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SYSTEMS = ["im", "mosquitto", "nats"]


def load(out):
    return json.loads((out / "results.json").read_text())


def rows(doc, scenario):
    return [e for e in doc["results"] if e["scenario"] == scenario]


def ratio(ours, theirs, lower_is_better):
    if not ours or not theirs:
        return ""
    r = ours / theirs
    better = r < 1 if lower_is_better else r > 1
    return f"{r:.2f} ({'ahead' if better else 'behind'})"


def idle_table(doc):
    lines = ["| system | transport | connections | failed | server RSS / conn | kernel slab / conn |", "|---|---|---|---|---|---|"]
    for e in rows(doc, "idle"):
        r = e["result"]
        lines.append(
            f"| {e['system']} | {e['params']['transport']} | {r['connections']} | {r['failed']} | "
            f"{r['rss_per_connection'] / 1024:.2f} KiB | {r['slab_per_connection'] / 1024:.2f} KiB |"
        )
    ours = {e["params"]["transport"]: e["result"]["rss_per_connection"] for e in rows(doc, "idle") if e["system"] == "im"}
    for peer in ("mosquitto", "nats"):
        theirs = [e["result"]["rss_per_connection"] for e in rows(doc, "idle") if e["system"] == peer]
        if theirs and "tcp" in ours:
            lines.append(f"| ratio im tcp / {peer} | | | | {ratio(ours['tcp'], theirs[0], True)} | |")
    return "\n".join(lines)


def rtt_groups(doc):
    """Round-trip runs grouped by (system, config, rate), in first-seen order; each group's
    percentiles and CPU are the medians over its rounds."""
    groups = {}
    for e in rows(doc, "rtt"):
        key = (e["system"], e["params"].get("config", ""), e["params"]["rate"])
        groups.setdefault(key, []).append(e["result"])
    out = []
    for (system, config, rate), runs in groups.items():
        med = lambda f: statistics.median(f(r) for r in runs)  # noqa: E731
        out.append({
            "system": system, "config": config, "rate": rate, "runs": len(runs),
            "completed": sum(r["completed"] for r in runs), "lost": sum(r["lost"] for r in runs),
            "p50": med(lambda r: r["latency"]["p50_us"]), "p99": med(lambda r: r["latency"]["p99_us"]),
            "p999": med(lambda r: r["latency"]["p999_us"]),
            "p50_range": (min(r["latency"]["p50_us"] for r in runs), max(r["latency"]["p50_us"] for r in runs)),
            "server_cores": med(lambda r: r["cpu"]["server_cores"]), "loadgen_cores": med(lambda r: r["cpu"]["loadgen_cores"]),
        })
    return out


def rtt_table(doc):
    lines = [
        "| system | config | offered | runs | completed | p50 (median) | p50 range | p99 (median) | p99.9 (median) | server CPU | loadgen CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = rtt_groups(doc)
    for g in groups:
        lines.append(
            f"| {g['system']} | {g['config']} | {g['rate']}/s | {g['runs']} | {g['completed']} (lost {g['lost']}) | "
            f"{g['p50']:.0f} µs | {g['p50_range'][0]}-{g['p50_range'][1]} µs | {g['p99']:.0f} µs | {g['p999']:.0f} µs | "
            f"{g['server_cores']:.2f} | {g['loadgen_cores']:.2f} |"
        )
    for ours, g in against_peers(groups, lambda g: g["config"] == "plugins on"):
        for what in ("p50", "p99"):
            lines.append(
                f"| ratio im (plugins on) / {g['system']} {what} | | {g['rate']}/s | | | "
                f"{ratio(ours[what], g[what], True)} | | | | | |"
            )
    return "\n".join(lines)


def against_peers(groups, ours_wanted=lambda g: True):
    """(our group, a peer's group) for every peer group with one of ours at its rate."""
    ours = {g["rate"]: g for g in groups if g["system"] == "im" and ours_wanted(g)}
    return [(ours[g["rate"]], g) for g in groups if g["system"] != "im" and g["rate"] in ours]


def fanout_groups(doc):
    """Fan-out runs grouped by (system, offered rate), in first-seen order; each group's
    figures are the medians over its rounds (results from before the kit ran rounds are
    groups of one)."""
    groups = {}
    for e in rows(doc, "fanout"):
        groups.setdefault((e["system"], e["result"]["offered_msgs_per_s"]), []).append(e["result"])
    out = []
    for (system, rate), runs in groups.items():
        med = lambda f: statistics.median(f(r) for r in runs)  # noqa: E731
        p99s = [r["latency"]["p99_us"] for r in runs]
        out.append({
            "system": system, "rate": rate, "runs": len(runs), "subscribers": runs[0]["subscribers"],
            "deliveries": sum(r["deliveries"] for r in runs), "expected": sum(r["expected"] for r in runs),
            "per_s": med(lambda r: r["deliveries_per_s"]),
            "p50": med(lambda r: r["latency"]["p50_us"]), "p99": med(lambda r: r["latency"]["p99_us"]),
            "p999": med(lambda r: r["latency"]["p999_us"]), "p99_range": (min(p99s), max(p99s)),
            "server_cores": med(lambda r: r["cpu"]["server_cores"]), "loadgen_cores": med(lambda r: r["cpu"]["loadgen_cores"]),
        })
    return out


def fanout_table(doc):
    lines = [
        "| system | offered msgs/s | subscribers | runs | deliveries | deliveries/s (median) | p50 (median) | p99 (median) | p99 range | p99.9 (median) | server CPU | loadgen CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = fanout_groups(doc)
    for g in groups:
        lines.append(
            f"| {g['system']} | {g['rate']} | {g['subscribers']} | {g['runs']} | {g['deliveries']} / {g['expected']} | {g['per_s']:.0f} | "
            f"{g['p50'] / 1000:.1f} ms | {g['p99'] / 1000:.1f} ms | {g['p99_range'][0] / 1000:.1f}-{g['p99_range'][1] / 1000:.1f} ms | "
            f"{g['p999'] / 1000:.1f} ms | {g['server_cores']:.2f} | {g['loadgen_cores']:.2f} |"
        )
    for ours, g in against_peers(groups):
        lines.append(
            f"| ratio im / {g['system']} p99 | {g['rate']} | | | | | | {ratio(ours['p99'], g['p99'], True)} | | | | |"
        )
    return "\n".join(lines)


def failed(result):
    """Sends that got an error or no answer in time, when there were any (results written
    before the kit counted them have no such field)."""
    n = result.get("failed", 0)
    return f" ({n} failed)" if n else ""


def durable_table(doc):
    lines = [
        "| system | run | offered | acked | acked/s | ack p50 | ack p99 | ack p99.9 | server CPU | loadgen CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario in ("durable", "durable-saturation", "plugins-fixed-rate", "plugins-saturation"):
        for e in rows(doc, scenario):
            r = e["result"]
            lat = r["ack_latency"]
            params = ", ".join(f"{k}={v}" for k, v in e["params"].items())
            offered = f"{r['offered_per_s']}/s" if "offered_per_s" in r else f"window {r['window']} x {r['senders']}"
            lines.append(
                f"| {e['system']} | {scenario} ({params}) | {offered} | {r['acked']}{failed(r)} | {r['acked_per_s']:.0f} | {lat['p50_us']} µs | {lat['p99_us']} µs | "
                f"{lat['p999_us']} µs | {r['cpu']['server_cores']:.2f} | {r['cpu']['loadgen_cores']:.2f} |"
            )
    ack_p99s, saturated = against_jetstream(doc)
    for rate, ours, theirs in ack_p99s:
        lines.append(f"| ratio im / nats | durable ack p99 | {rate}/s | | | | {ratio(ours, theirs, True)} | | | |")
    if saturated:
        lines.append(
            f"| ratio im / nats | durable-saturation acked/s | | | {ratio(*saturated, False)} | | | | | |"
        )
    cost = filter_cost(doc)
    if cost:
        lines.append(
            f"| im | 3 filters cost ({cost['detail']}) | | | {cost['percent']:.1f}% of throughput | | | | | |"
        )
    return "\n".join(lines)


def against_jetstream(doc):
    """Against JetStream, the peer that stores and acknowledges each message as we do:
    [(rate, our ack p99, its ack p99)] and (our saturated rate, its) or None."""
    p99_by_rate = {}
    for e in rows(doc, "durable"):
        p99_by_rate.setdefault(e["params"]["rate"], {})[e["system"]] = e["result"]["ack_latency"]["p99_us"]
    ack_p99s = [(rate, systems["im"], systems["nats"])
                for rate, systems in sorted(p99_by_rate.items()) if "im" in systems and "nats" in systems]
    saturated = {e["system"]: e["result"]["acked_per_s"] for e in rows(doc, "durable-saturation")}
    both = (saturated["im"], saturated["nats"]) if saturated.get("im") and saturated.get("nats") else None
    return ack_p99s, both


def filter_cost(doc):
    """What three filters cost of the saturated rate: the medians of the interleaved rounds
    per filter count (single runs on a shared 2-core machine vary by tens of percent), with
    each round's own figure for its spread; None without both configurations."""
    by_filters = {}
    by_round = {}
    for e in rows(doc, "plugins-saturation"):
        by_filters.setdefault(e["params"]["filters"], []).append(e["result"]["acked_per_s"])
        by_round.setdefault(e["params"]["round"], {})[e["params"]["filters"]] = e["result"]["acked_per_s"]
    sat = {f: statistics.median(v) for f, v in by_filters.items()}
    if not (0 in sat and 3 in sat and sat[0]):
        return None
    per_round = [100 * (1 - r[3] / r[0]) for r in by_round.values() if r.get(0) and 3 in r]
    spread = f"; round by round {min(per_round):.1f}-{max(per_round):.1f}%" if per_round else ""
    return {
        "percent": 100 * (1 - sat[3] / sat[0]),
        "detail": f"median of {len(by_filters[0])} rounds: {sat[0]:,.0f}/s with 0, {sat[3]:,.0f}/s with 3{spread}",
    }


def load_hooks(out, name):
    """hook_bench's rows (`HOOK_BENCH_JSON`) by (case, body bytes), if the run wrote them."""
    path = out / name
    if not path.exists():
        return {}
    return {(r["case"], r["body_bytes"]): r["ns"] for r in json.loads(path.read_text())}


def hooks_table(hooks, cold):
    lines = ["| chain | body | back to back | after 1 ms idle |", "|---|---|---|---|"]
    for (case, body), ns in hooks.items():
        idle = cold.get((case, body))
        lines.append(f"| {case} | {body} B | {ns:.0f} ns | {f'{idle:.0f} ns' if idle else ''} |")
    return "\n".join(lines)


# The hooks the per-hook target is read on: each plugin kind's call on a 100 B message.
TARGET_HOOKS = ["no-op filter", "no-op screen", "keyword filter", "risk control (send)"]


def verdict(ok):
    return "**met**" if ok else "**missed**"


def verdicts(**parts):
    """One verdict per part of a target, e.g. `rate met, p99 missed`; `met` when all are."""
    if all(parts.values()):
        return verdict(True)
    return "**" + ", ".join(f"{name} {'met' if ok else 'missed'}" for name, ok in parts.items()) + "**"


def targets_table(doc, apart_doc, hooks):
    """The issue's targets read from this run: the figure each is checked on and the
    verdict, or why this run does not read it."""
    lines = ["| target | this run | verdict |", "|---|---|---|"]

    idle = {e["params"]["transport"]: e["result"] for e in rows(doc, "idle") if e["system"] == "im"}
    if "tcp" in idle and "ws" in idle:
        tcp, ws = idle["tcp"], idle["ws"]
        figure = (f"TCP {tcp['rss_per_connection'] / 1024:.2f} KiB at {tcp['connections']:,}, "
                  f"WS {ws['rss_per_connection'] / 1024:.2f} KiB at {ws['connections']:,}")
        if min(tcp["connections"], ws["connections"]) >= 19_000:
            ok = max(tcp["rss_per_connection"], ws["rss_per_connection"]) <= 4096 and not (tcp["failed"] or ws["failed"])
            lines.append(f"| <= 4 KiB per idle TCP / WebSocket connection at 19,000 | {figure} | {verdict(ok)} |")
        else:
            lines.append(f"| <= 4 KiB per idle TCP / WebSocket connection at 19,000 | {figure} | not read: fewer than 19,000 connections (full mode reads it) |")
    if "quic" in idle:
        q = idle["quic"]
        figure = f"{q['rss_per_connection'] / 1024:.2f} KiB at {q['connections']:,} ({q['failed']} failed)"
        if q["connections"] >= 50_000:
            ok = q["rss_per_connection"] <= 16 * 1024 and not q["failed"]
            lines.append(f"| QUIC: >= 50,000 connections in one process at <= 16 KiB each | {figure} | {verdict(ok)} |")
        else:
            lines.append(f"| QUIC: >= 50,000 connections in one process at <= 16 KiB each | {figure} | not read: fewer than 50,000 connections (full mode reads it) |")

    for name, d in (("", doc), (", pinned apart", apart_doc)):
        if not d:
            continue
        rtt = [g for g in rtt_groups(d) if g["system"] == "im" and g["config"] == "plugins on" and g["rate"] == 5000]
        if rtt:
            g = rtt[0]
            lines.append(f"| 1:1 round trip p50 <= 250 µs, p99 <= 1 ms at 5,000/s, plugins on{name} | "
                         f"p50 {g['p50']:,.0f} µs, p99 {g['p99']:,.0f} µs (medians of {g['runs']} runs) | "
                         f"{verdicts(p50=g['p50'] <= 250, p99=g['p99'] <= 1000)} |")

    fan = [g for g in fanout_groups(doc) if g["system"] == "im"]
    if fan:
        best = max(fan, key=lambda g: g["per_s"])
        near = min(fan, key=lambda g: abs(g["rate"] * g["subscribers"] - 100_000))
        ok = verdicts(rate=best["per_s"] >= 150_000, p99=near["p99"] <= 10_000)
        lines.append(f"| fan-out >= 150,000 deliveries/s; p99 <= 10 ms at 100,000/s | "
                     f"{best['per_s']:,.0f}/s at {best['rate']} msgs/s; p99 {near['p99'] / 1000:.1f} ms at "
                     f"{near['rate'] * near['subscribers']:,} deliveries/s offered (medians of {near['runs']} runs) | {ok} |")

    saturated = [e["result"]["acked_per_s"] for e in rows(doc, "durable-saturation") if e["system"] == "im"]
    at_50k = [e["result"]["ack_latency"]["p99_us"] for e in rows(doc, "durable")
              if e["system"] == "im" and e["params"]["rate"] == 50_000]
    if saturated and at_50k:
        ok = verdicts(rate=saturated[0] >= 50_000, p99=at_50k[0] <= 10_000)
        lines.append(f"| >= 50,000 durable messages/s, p99 ack <= 10 ms | {saturated[0]:,.0f}/s saturated; "
                     f"p99 {at_50k[0] / 1000:.1f} ms at 50,000/s | {ok} |")

    measured = {case: hooks[(case, 100)] for case in TARGET_HOOKS if (case, 100) in hooks}
    if measured:
        over = [case for case, ns in measured.items() if ns > 1000]
        figure = ", ".join(f"{case} {ns:,.0f} ns" for case, ns in measured.items())
        lines.append(f"| each plugin hook <= 1 µs on a 100 B message | {figure} (back to back, `hook_bench`) | "
                     f"{verdict(not over)}{': ' + ', '.join(over) if over else ''} |")
    cost = filter_cost(doc)
    if cost:
        lines.append(f"| three filters cost <= 15 % of throughput | {cost['percent']:.1f} % ({cost['detail']}) | {verdict(cost['percent'] <= 15)} |")

    for scenario, compared in peer_ratios(doc, apart_doc):
        behind = [what for what, r in compared if r >= 1]
        figure = ", ".join(f"{what} {r:.2f}" for what, r in compared)
        lines.append(f"| ahead of mosquitto and nats-server: {scenario} (ours / theirs, lower is better) | {figure} | "
                     f"{verdict(not behind)}{f' (behind on {len(behind)} of {len(compared)})' if behind else ''} |")
    return "\n".join(lines)


def peer_ratios(doc, apart_doc):
    """Per shared scenario, (what, ours / theirs) for every figure this run has of ours and
    a peer's, lower better (a rate's ratio is theirs / ours)."""
    out = []
    idle = {(e["system"], e["params"]["transport"]): e["result"]["rss_per_connection"] for e in rows(doc, "idle")}
    compared = [(peer, idle[("im", "tcp")] / idle[(peer, "tcp")])
                for peer in ("mosquitto", "nats") if ("im", "tcp") in idle and (peer, "tcp") in idle]
    if compared:
        out.append(("idle memory per TCP connection", compared))
    for name, d in (("1:1 round trip, plugins on", doc), ("1:1 round trip pinned apart, plugins on", apart_doc)):
        if not d:
            continue
        compared = [(f"{g['system']} {what} at {g['rate']:,}/s", ours[what] / g[what])
                    for ours, g in against_peers(rtt_groups(d), lambda g: g["config"] == "plugins on")
                    for what in ("p50", "p99")]
        if compared:
            out.append((name, compared))
    compared = [(f"{g['system']} p99 at {g['rate']} msgs/s", ours["p99"] / g["p99"])
                for ours, g in against_peers(fanout_groups(doc))]
    if compared:
        out.append(("group fan-out", compared))
    ack_p99s, saturated = against_jetstream(doc)
    compared = [(f"ack p99 at {rate:,}/s", ours / theirs) for rate, ours, theirs in ack_p99s]
    if saturated:
        compared.append(("saturated rate", saturated[1] / saturated[0]))
    if compared:
        out.append(("durable sends against JetStream", compared))
    return out


def line_plot(out, name, title, xlabel, ylabel, series):
    """Writes one line per system of `series` (system -> [(x, y)]) to out/name; None, and
    no file, when the run measured none (say, an `--only plugins` run)."""
    if not any(series.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for system, pts in series.items():
        if pts:
            ax.plot(*zip(*sorted(pts)), marker="o", label=f"{system} p99")
    ys = [y for pts in series.values() for _, y in pts]
    # A peer far behind would flatten every other line: past a factor of 20, a log scale.
    if ys and min(ys) > 0 and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
        ylabel += " (log scale)"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    return name


def plot(out, doc):
    rtt = {
        system: [(g["rate"], g["p99"]) for g in rtt_groups(doc)
                 if g["system"] == system and (system != "im" or g["config"] == "plugins on")]
        for system in SYSTEMS
    }
    fanout = {
        system: [(g["rate"] * g["subscribers"], g["p99"] / 1000) for g in fanout_groups(doc) if g["system"] == system]
        for system in SYSTEMS
    }
    written = [name for name in (
        line_plot(out, "rtt.png", "1:1 round trip p99", "offered round trips/s", "µs", rtt),
        line_plot(out, "fanout.png", "Fan-out to a 1,000-member group: delivery p99", "offered deliveries/s", "ms", fanout),
    ) if name]
    idle = rows(doc, "idle")
    if idle:
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [f"{e['system']} {e['params']['transport']}" for e in idle]
        ax.bar(labels, [e["result"]["rss_per_connection"] / 1024 for e in idle])
        ax.set_ylabel("KiB server RSS per idle connection")
        ax.set_title("Idle connection memory")
        fig.tight_layout()
        fig.savefig(out / "idle.png", dpi=100)
        written.append("idle.png")
    return written


def pinning_line(doc):
    pin = doc.get("pinning")
    workers = doc.get("server_worker_threads") or "one per core"
    where = (f"servers pinned to cpus {pin['server_cpus']}, load generator to cpus {pin['loadgen_cpus']}"
             if pin else "servers and load generator share every core")
    return f"Cores: {where}; our server's worker threads: {workers}."


def idle_line(machine):
    idle = machine.get("idle") or {}
    driver = idle.get("cpuidle_driver") or "unknown"
    poll = idle.get("guest_halt_poll_ns")
    polling = (f", idle vCPUs poll {poll:,} ns before halting (guest_halt_poll_ns)"
               if poll is not None else "")
    return f"Idle cpus: cpuidle driver {driver}{polling}."


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "target/bench")
    doc = load(out)
    machine = doc["machine"]
    parts = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}. Quick mode: {doc['quick']}.",
        "",
        pinning_line(doc),
        "",
        idle_line(machine),
        "",
        "Durability: " + "; ".join(f"{k}: {v}" for k, v in doc["durability"].items()) + ".",
        "",
        "### Idle connections",
        "",
        idle_table(doc),
        "",
        "### 1:1 round trip (open loop, 100 B)",
        "",
        rtt_table(doc),
        "",
        "### Group fan-out (one sender, 1,000-member group, all online)",
        "",
        fanout_table(doc),
        "",
        "### Durable sends and plugin cost",
        "",
        durable_table(doc),
        "",
    ]
    hooks, hooks_cold = load_hooks(out, "hooks.json"), load_hooks(out, "hooks-cold.json")
    if hooks:
        parts += [
            "### Plugin hook calls (`hook_bench`, 100 B unless stated)",
            "",
            hooks_table(hooks, hooks_cold),
            "",
        ]
    apart = out / "apart"
    apart_doc = load(apart) if (apart / "results.json").exists() else None
    if apart_doc:
        parts += [
            "### 1:1 round trip, servers pinned apart from the load generator",
            "",
            pinning_line(apart_doc) + " Left to the kernel (the table above), a "
            "single-threaded server tends to share the load generator's cpu; pinned apart, "
            "every system pays the same hand-offs between cpus, as with clients on other machines.",
            "",
            rtt_table(apart_doc),
            "",
        ]
    parts += ["### Against the targets", "", targets_table(doc, apart_doc, hooks), ""]
    for png in plot(out, doc):
        parts.append(f"![{png}]({png})")
    (out / "results.md").write_text("\n".join(parts) + "\n")
    print(f"wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
