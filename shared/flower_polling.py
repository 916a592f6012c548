"""Flower's fixed waits that dominate a deployed round, and the shorter ones fedhelix uses.

Flower 1.42 polls with hard-coded sleeps: a SuperNode sleeps 3 s after an
empty pull and 0.5 s while it waits for its ClientApp's reply, SuperExec
looks for a task every 1 s, the ServerApp's grid sleeps 3 s between pulls
and an object pull first retries after 1 s. With two exchanges per round
that is ~15 s of waiting per round on loopback. The values below are the
fast path's; every place that changes a Flower private first checks that
what it changes still exists (see :class:`FlowerInternalsChanged`), so a
Flower upgrade fails loudly instead of silently running slow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# The Flower version whose private waits these patches were written against (pyproject pins it).
VERIFIED_FLWR_VERSION = "1.42.0"

TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own knob for SuperExec (0.01-60 s)


@dataclass(frozen=True)
class PollIntervals:
    """Seconds between polls on the fast path (Flower's stock values in comments).

    Idle polling costs CPU on the SuperLink in proportion to nodes / ``node_s``
    (measured: link + 2 nodes 2.4% of a core stock, 11% at 0.2 s, 32% at 0.05 s).
    """

    node_s: float = 0.1  # SuperNode pull from the SuperLink when idle (3 s)
    reply_s: float = 0.02  # SuperNode wait for the local ClientApp's reply, in-process (0.5 s)
    task_s: float = 0.05  # launcher / SuperExec: acquire a task from the node's Runtime API (1 s)
    grid_s: float = 0.1  # ServerApp: pull replies from the SuperLink (3 s)
    pull_backoff_s: float = 0.05  # first retry of an object pull, doubling to Flower's cap (1 s)
    # SuperNode heartbeat interval (30 s): the SuperLink counts a node offline 2 intervals after its last
    # heartbeat, answers its pending messages with Flower's node-unavailable error and lets a restarted
    # node rejoin. 10 s is the shortest Flower accepts; a heartbeat then leaves every ~4 s.
    heartbeat_s: float = 10.0
    # Idle polls slow down, doubling from the values above up to this, until work arrives again:
    # a handful of nodes polling every 0.1 s keeps a SuperLink busy (measured: 5 nodes, 62% of a
    # core for the SuperLink, 146% in all), while a message waits at most this long once idle.
    idle_cap_s: float = 0.5
    # The server's SuperExec looking for a new run to start (1 s): once per study, not per round, and
    # at 0.05 s its polls alone kept the SuperLink at a third of a core.
    run_start_s: float = 0.5

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not 0.001 <= value <= 60:
                raise ValueError(f"poll interval {name}={value} must be between 0.001 and 60 seconds")


FAST = PollIntervals()


class IdleBackoff:
    """Delays for repeated empty polls: ``start``, doubling, up to ``cap``; back to ``start`` on activity."""

    def __init__(self, start: float, cap: float) -> None:
        self.start = start
        self.cap = max(start, cap)
        self._next = start

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.start


class FlowerInternalsChanged(RuntimeError):
    """A private Flower detail the fast path relies on is gone: the installed Flower moved on."""

    def __init__(self, what: str) -> None:
        import flwr

        super().__init__(
            f"fedhelix fast rounds: {what} (written against flwr {VERIFIED_FLWR_VERSION}, installed {flwr.__version__}); "
            "run with Flower's stock polling (the --stock flag / poll-interval=0) or update shared/flower_polling.py"
        )


def _pull_functions() -> list[Callable]:
    from flwr.supercore.inflatable import inflatable_utils

    return [inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree]


def check_object_pull_backoff() -> None:
    """Raise :class:`FlowerInternalsChanged` unless the object-pull backoff can be shortened."""
    for fn in _pull_functions():
        if "initial_backoff" not in (fn.__kwdefaults__ or {}):
            raise FlowerInternalsChanged(f"{fn.__module__}.{fn.__name__} has no keyword default 'initial_backoff'")


def shorten_object_pull_backoff(seconds: float = FAST.pull_backoff_s) -> None:
    """Make object pulls in this process retry after ``seconds`` instead of 1 s.

    Flower passes the backoff as a keyword default (bound at import), so the
    module constant alone would change nothing; the defaults themselves are set.
    Once polling is fast, a reply's objects are often pulled before they are
    uploaded, and the 1 s first retry then costs a second per exchange.
    """
    check_object_pull_backoff()
    for fn in _pull_functions():
        fn.__kwdefaults__["initial_backoff"] = seconds
