"""A transparent proxy around Flower's Grid that reports every error reply.

Flower's legacy workflows turn a site's error into an anonymous exception; the
tap sees the reply first, with its source node, so the report can say which
site failed and why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

OnError = Callable[[str, int, int, str], None]  # (message_type, round, node_id, reason)
Observer = Callable[[list[Message], list[Message]], None]  # (sent, replies)


NO_REPLY = "no reply within the round timeout of {timeout:g} s (dropped from the round)"
# The SuperLink answers for a node that stopped sending heartbeats (crashed, killed, cut off).
NODE_OFFLINE = "no reply: the node went offline (no heartbeat for two of its intervals; dropped from the round)"


class TappedGrid:
    """Delegates everything to ``grid``; calls ``on_error`` for each error reply.

    ``observe`` (optional) sees every exchange exactly as the coordinator does:
    tests use it to check what the server can read of a site's update.
    ``timeout`` is the study's per-round timeout, applied where Flower's own
    workflow waits without one; a node that did not answer in time is reported
    to ``on_error`` as dropped, and the round goes on with the others.
    """

    def __init__(self, grid: Grid, on_error: OnError, observe: Observer | None = None, timeout: float | None = None) -> None:
        self._grid = grid
        self._on_error = on_error
        self._observe = observe
        self._timeout = timeout

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = list(messages)
        timeout = timeout if timeout is not None else self._timeout
        replies = list(self._grid.send_and_receive(sent, timeout=timeout))
        if self._observe is not None:
            self._observe(sent, replies)
        # Flower's grids give each message its id as they push it; a reply names the message it answers.
        # (An error the SuperLink writes for an offline node comes from the SuperLink, not from that node.)
        by_id = {m.metadata.message_id: m for m in sent if m.metadata.message_id}
        by_node = {m.metadata.dst_node_id: m for m in sent}
        answered = set()
        for reply in replies:
            original = by_id.get(reply.metadata.reply_to_message_id) or by_node.get(reply.metadata.src_node_id)
            node = original.metadata.dst_node_id if original is not None else reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                meta = original.metadata if original is not None else reply.metadata
                reason = NODE_OFFLINE if reply.error.code == ErrorCode.NODE_UNAVAILABLE else reply.error.reason
                self._on_error(meta.message_type, _round(meta.group_id), node, reason)
        if timeout is not None:
            for message in sent:
                if message.metadata.dst_node_id not in answered:
                    meta = message.metadata
                    self._on_error(meta.message_type, _round(meta.group_id), meta.dst_node_id, NO_REPLY.format(timeout=timeout))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _round(group_id: str) -> int:
    """Flower's legacy workflows put the round number in the message's group id."""
    return int(group_id) if str(group_id).isdigit() else 0
