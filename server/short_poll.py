"""The ServerApp's wait for replies, polling every 0.1 s instead of Flower's 3 s.

Flower's ``HttpGrid.send_and_receive`` (deployment) sleeps a fixed 3 s between
pulls, so every exchange with the sites costs up to 3 s of idle waiting; a
round is two exchanges, a SecAgg+ round five. :func:`send_and_receive` is the
same loop over the grid's public ``push_messages``/``pull_messages`` with the
same timeout semantics and a short interval. The run config key
``poll-interval`` chooses it: seconds between pulls, ``0`` for Flower's stock
loop (kept so both can be measured side by side).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from flwr.app import Message
from flwr.serverapp import Grid

from shared.errors import ConfigError
from shared.flower_polling import FAST, shorten_object_pull_backoff

POLL_INTERVAL_KEY = "poll-interval"  # run config: seconds between the ServerApp's pulls; 0 = Flower's stock loop


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float | None = None, interval: float = FAST.grid_s) -> list[Message]:
    """Push ``messages``, then pull replies every ``interval`` s until all arrived or ``timeout`` passed.

    Same contract as Flower's ``Grid.send_and_receive``: ``timeout=None`` waits
    for every reply; otherwise the replies received by then are returned
    (possibly none: ``timeout=0`` pulls nothing).
    """
    pending = set(grid.push_messages(messages))
    end = time.time() + (timeout if timeout is not None else 0.0)
    replies: list[Message] = []
    while timeout is None or time.time() < end:
        received = list(grid.pull_messages(pending))
        replies.extend(received)
        pending.difference_update(m.metadata.reply_to_message_id for m in received)
        if not pending:
            break
        wait = interval if timeout is None else min(interval, max(0.0, end - time.time()))
        time.sleep(wait)
    return replies


def poll_interval(run_config: Mapping[str, object]) -> float | None:
    """The run config's ``poll-interval`` (default on), or ``None`` for Flower's stock loop."""
    raw = run_config.get(POLL_INTERVAL_KEY, FAST.grid_s)
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"run config {POLL_INTERVAL_KEY}={raw!r} is not a number of seconds. Fix: -c \"{POLL_INTERVAL_KEY}=0.1\" (or 0 for Flower's stock polling)") from None
    if value < 0 or value > 60:
        raise ConfigError(f"run config {POLL_INTERVAL_KEY}={value} is out of range. Fix: a value from 0.001 to 60 seconds, or 0 for Flower's stock polling")
    return value or None


class ShortPollGrid:
    """Delegates everything to ``grid`` except ``send_and_receive``, which polls every ``interval`` s.

    Also shortens the object-pull backoff in this (the ServerApp's) process:
    with fast polling, a reply's objects are often requested before they are uploaded.
    """

    def __init__(self, grid: Grid, interval: float = FAST.grid_s) -> None:
        self._grid = grid
        self.interval = interval
        shorten_object_pull_backoff()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return send_and_receive(self._grid, messages, timeout=timeout, interval=self.interval)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
