"""A message filter written in Python: proof that the WIT contract, not Rust, is the API.

It appends " (checked by python #<n>)" to every text message, where <n> counts the
messages it has seen in the plugin's key-value store, and the word "python" in a message is
replaced by the configured `replacement`.
"""

from wit_world import exports
from wit_world.exports import message_filter
from wit_world.imports import config, kv, log


class MessageFilter(exports.MessageFilter):
    def filter(self, ctx, message):
        try:
            text = bytes(message.body()).decode("utf-8")
        except UnicodeDecodeError:
            return message_filter.FilterVerdict_Allow()
        replacement = config.get("replacement") or "snake"
        count = kv.increment("seen", 1, None)
        log.log(log.Level.DEBUG, f"python filter saw message {count} on {ctx.transport()}")
        rewritten = f"{text.replace('python', replacement)} (checked by python #{count})"
        return message_filter.FilterVerdict_Modify(
            message_filter.Rewrite(body=rewritten.encode("utf-8"), content_type=message.content_type())
        )
