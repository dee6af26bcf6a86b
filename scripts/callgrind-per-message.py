#!/usr/bin/env python3
"""Per-message counts from callgrind dumps of the server (see scripts/callgrind-rtt.sh).

For each dump: instructions per message and calls per message of the allocator, String
clones and SipHash writes, where a message is one push encoded (MESSAGE below).
Dumps with fewer than 500 messages (startup, shutdown) are skipped; the last line sums
the others.
"""
import re
import subprocess
import sys

COUNTED = {
    "alloc": re.compile(r"__rustc::__rust_alloc$"),
    "string_clone": re.compile(r"<alloc::string::String as core::clone::Clone>::clone$"),
    "siphash_write": re.compile(r"<core::hash::sip::Hasher<S> as core::hash::Hasher>::write$"),
}
# A message: one push encoded (`to_proto` until 2026-12-07, then `deliver_frame`; the
# round trip's recipients are online, so every message is pushed once).
MESSAGE = re.compile(r"(im_server::pipeline::to_proto|im_proto::encode::deliver_frame)$")
# The message path's entry points, whose inclusive instructions leave out what a window
# holds besides messages (idle wake-ups, WAL checkpoints, logins): a frame's handling in
# the session (filters, risk check, the hand-off to the pipeline), the commit, the answers
# and pushes, and the applier's copy into SQLite.
# Each entry is a list of alternatives, each a tuple of functions whose inclusive counts
# add up; the largest alternative counts (builds name the same work differently: until
# 2026-12-07 a frame's whole handling ran inside `handle_frame`'s future, since then
# `handle_frame` decodes and the handler of each kind runs in a future of its own).
ENTRY_POINTS = (
    [
        ("im_server::session::LoggedIn::handle_frame::{{closure}}",),
        (
            "im_server::session::LoggedIn::handle_frame",
            "im_server::session::LoggedIn::send::{{closure}}",
            "im_server::session::LoggedIn::deliver_ack::{{closure}}",
            "im_server::session::LoggedIn::handle_request::{{closure}}",
        ),
    ],
    [("im_server::pipeline::Committer::commit_sends::{{closure}}",)],
    [("im_server::pipeline::Dispatcher::answer_sends",)],
    [("im_store::sqlite::journal::apply",)],
)
NAMED = re.compile(r"^c?fn=\((\d+)\)(?: (.*))?$")


def per_message(path):
    names, calls, total, callee = {}, {k: 0 for k in COUNTED}, 0, None
    messages = 0
    with open(path, errors="replace") as dump:
        for line in dump:
            line = line.rstrip("\n")
            if line.startswith("summary:"):
                total = int(line.split()[1])
                continue
            named = NAMED.match(line)
            if named:
                number, name = named.groups()
                if name:
                    names[number] = name
                callee = names.get(number, "") if line.startswith("cfn=") else None
                continue
            if line.startswith("calls=") and callee is not None:
                n = int(line[6:].split()[0])
                if MESSAGE.search(callee):
                    messages += n
                for key, pattern in COUNTED.items():
                    if pattern.search(callee):
                        calls[key] += n
                callee = None
    return total, messages, calls


def message_path(path):
    """Inclusive instructions of the entry points, from callgrind_annotate."""
    out = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
        capture_output=True, text=True, check=True,
    ).stdout
    # A function shows once per source file its code came from (inlining), and those rows
    # nest; the largest is the whole function.
    names = {name for entry in ENTRY_POINTS for names in entry for name in names}
    largest = dict.fromkeys(names, 0)
    for row in out.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+\S*?:(.*?)(?: \[.*\])?$", row)
        if m and m.group(2) in largest:
            largest[m.group(2)] = max(largest[m.group(2)], int(m.group(1).replace(",", "")))
    return sum(
        max(sum(largest[name] for name in names) for names in entry) for entry in ENTRY_POINTS
    )


def line(label, total, path_total, messages, calls):
    counts = " ".join(f"{k}/msg={v / messages:.1f}" for k, v in calls.items())
    print(
        f"{label}: messages={messages} instructions/msg={total // messages} "
        f"message-path instructions/msg={path_total // messages} {counts}"
    )


def main():
    sums = [0, 0, 0, {k: 0 for k in COUNTED}]
    for path in sys.argv[1:]:
        total, messages, calls = per_message(path)
        if messages < 500:
            continue
        path_total = message_path(path)
        line(path, total, path_total, messages, calls)
        sums[0] += total
        sums[1] += path_total
        sums[2] += messages
        for key, n in calls.items():
            sums[3][key] += n
    if sums[2]:
        line("all windows", *sums)


if __name__ == "__main__":
    main()
