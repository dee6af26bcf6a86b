#!/usr/bin/env python3
"""Per-message counts from callgrind dumps of the server (see scripts/callgrind-rtt.sh).

For each dump: instructions per message and calls per message of the allocator, String
clones and SipHash writes, where a message is one call of `im_server::pipeline::to_proto`.
Dumps with fewer than 500 messages (startup, shutdown) are skipped.
"""
import re
import sys

COUNTED = {
    "alloc": re.compile(r"__rustc::__rust_alloc$"),
    "string_clone": re.compile(r"<alloc::string::String as core::clone::Clone>::clone$"),
    "siphash_write": re.compile(r"<core::hash::sip::Hasher<S> as core::hash::Hasher>::write$"),
}
MESSAGE = re.compile(r"im_server::pipeline::to_proto$")
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


def main():
    for path in sys.argv[1:]:
        total, messages, calls = per_message(path)
        if messages < 500:
            continue
        counts = " ".join(f"{k}/msg={v / messages:.1f}" for k, v in calls.items())
        print(f"{path}: messages={messages} instructions/msg={total // messages} {counts}")


if __name__ == "__main__":
    main()
