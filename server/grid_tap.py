"""A transparent proxy around Flower's Grid that reports every error reply.

Flower's legacy workflows turn a site's error into an anonymous exception; the
tap sees the reply first, with its source node, so the report can say which
site failed and why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

OnError = Callable[[str, int, int, str], None]  # (message_type, round, node_id, reason)
Observer = Callable[[list[Message], list[Message]], None]  # (sent, replies)


class TappedGrid:
    """Delegates everything to ``grid``; calls ``on_error`` for each error reply.

    ``observe`` (optional) sees every exchange exactly as the coordinator does:
    tests use it to check what the server can read of a site's update.
    """

    def __init__(self, grid: Grid, on_error: OnError, observe: Observer | None = None) -> None:
        self._grid = grid
        self._on_error = on_error
        self._observe = observe

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = list(messages)
        kinds = {m.metadata.dst_node_id: (m.metadata.message_type, m.metadata.group_id) for m in sent}
        replies = list(self._grid.send_and_receive(sent, timeout=timeout))
        if self._observe is not None:
            self._observe(sent, replies)
        for reply in replies:
            if reply.has_error():
                kind, group = kinds.get(reply.metadata.src_node_id, (reply.metadata.message_type, "0"))
                server_round = int(group) if str(group).isdigit() else 0
                self._on_error(kind, server_round, reply.metadata.src_node_id, reply.error.reason)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
