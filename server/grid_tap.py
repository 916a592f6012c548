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


NO_REPLY = "no reply within the round timeout of {timeout:g} s (dropped from the round)"


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
        kinds = {m.metadata.dst_node_id: (m.metadata.message_type, m.metadata.group_id) for m in sent}
        timeout = timeout if timeout is not None else self._timeout
        replies = list(self._grid.send_and_receive(sent, timeout=timeout))
        if self._observe is not None:
            self._observe(sent, replies)
        for reply in replies:
            if reply.has_error():
                kind, group = kinds.get(reply.metadata.src_node_id, (reply.metadata.message_type, "0"))
                server_round = int(group) if str(group).isdigit() else 0
                self._on_error(kind, server_round, reply.metadata.src_node_id, reply.error.reason)
        if timeout is not None:
            answered = {reply.metadata.src_node_id for reply in replies}
            for message in sent:
                node = message.metadata.dst_node_id
                if node not in answered:
                    group = message.metadata.group_id
                    server_round = int(group) if str(group).isdigit() else 0
                    self._on_error(message.metadata.message_type, server_round, node, NO_REPLY.format(timeout=timeout))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
