"""Flower's own SuperNode, with short polls instead of its hard-coded 3 s and 0.5 s sleeps.

``flwr/supernode/start_client_internal.py`` sleeps ``time.sleep(3)`` after every
empty pull from the SuperLink and ``time.sleep(0.5)`` while it waits for the
ClientApp's reply; nothing configures either. Both are calls on the module's
``time`` global, so this entry point gives that module a ``time`` whose
``sleep`` shortens exactly those two waits, then runs Flower's unchanged
``flower-supernode`` main. It also shortens the node's heartbeat interval
(Flower's module constant, 30 s, to 10 s, the shortest the SuperLink accepts),
so a crashed node is seen offline after 20 s instead of a minute, and can
rejoin as soon. :func:`apply_short_polls` first checks the targets and raises
:class:`~shared.flower_polling.FlowerInternalsChanged` if they moved, so a
Flower upgrade fails loudly.

    python -m client.fast_supernode [--poll-interval S] [--reply-poll-interval S] FLOWER-SUPERNODE-ARGS...
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
import types
from collections.abc import Sequence

from shared.flower_env import apply_flower_env
from shared.flower_polling import FAST, TASK_POLL_ENV, FlowerInternalsChanged, IdleBackoff, shorten_object_pull_backoff

# Modules that read Flower's HEARTBEAT_DEFAULT_INTERVAL at call time: the activation / heartbeat
# requests (their interval sets the node's online-until on the SuperLink) and the sender's cadence.
HEARTBEAT_MODULES = ("flwr.supernode.fleet_http_connection", "flwr.supercore.heartbeat")
IDLE_SLEEP_S = 3  # start_client_internal: `time.sleep(3)` when a pull returned nothing
REPLY_SLEEP_S = 0.5  # start_client_internal._push_messages: `time.sleep(0.5)` waiting for the reply


class ShortSleeps(types.ModuleType):
    """Stands in for the ``time`` module inside one Flower module: maps its fixed sleeps to short ones.

    The idle sleep (after an empty pull) backs off from ``node_s`` to ``idle_cap_s`` while nothing
    arrives; waiting for a reply, or a loop pass that did work in between, starts it over.
    """

    BUSY_GAP_S = 1.0  # a pass longer than this between idle sleeps handled a message

    def __init__(self, mapping: dict[float, float], idle_cap_s: float | None = None) -> None:
        super().__init__("time")
        self._mapping = dict(mapping)
        start = self._mapping.get(IDLE_SLEEP_S, IDLE_SLEEP_S)
        self._idle = IdleBackoff(start, idle_cap_s if idle_cap_s is not None else start)
        self._last_idle_end: float | None = None

    def sleep(self, seconds: float) -> None:
        if seconds == IDLE_SLEEP_S:
            if self._last_idle_end is None or time.monotonic() - self._last_idle_end > self.BUSY_GAP_S:
                self._idle.reset()
            time.sleep(self._idle.next())
            self._last_idle_end = time.monotonic()
            return
        if seconds == REPLY_SLEEP_S:
            self._idle.reset()
        time.sleep(self._mapping.get(seconds, seconds))

    def __getattr__(self, name: str):  # time.time, time.monotonic, ... unchanged
        return getattr(time, name)


def _supernode_module() -> types.ModuleType:
    from flwr.supernode import start_client_internal

    return start_client_internal


def check_supernode_targets() -> None:
    """Raise :class:`FlowerInternalsChanged` unless the SuperNode's sleeps are where we expect them."""
    module = _supernode_module()
    current = getattr(module, "time", None)
    if not (current is time or isinstance(current, ShortSleeps)):
        raise FlowerInternalsChanged("flwr.supernode.start_client_internal no longer uses the module global `time`")
    for function, call in (("start_client_internal", f"time.sleep({IDLE_SLEEP_S})"), ("_push_messages", f"time.sleep({REPLY_SLEEP_S})")):
        target = getattr(module, function, None)
        if target is None or call not in inspect.getsource(target):
            raise FlowerInternalsChanged(f"flwr.supernode.start_client_internal.{function} no longer calls `{call}`")


def shorten_heartbeat(interval_s: float = FAST.heartbeat_s) -> float:
    """Set the SuperNode's heartbeat interval in this process (never below Flower's minimum); returns it."""
    from flwr.common.constant import HEARTBEAT_MIN_INTERVAL

    interval = max(float(interval_s), float(HEARTBEAT_MIN_INTERVAL))
    for name in HEARTBEAT_MODULES:
        module = importlib.import_module(name)
        if not isinstance(getattr(module, "HEARTBEAT_DEFAULT_INTERVAL", None), (int, float)):
            raise FlowerInternalsChanged(f"{name} no longer reads HEARTBEAT_DEFAULT_INTERVAL")
        module.HEARTBEAT_DEFAULT_INTERVAL = interval
    return interval


def apply_short_polls(
    node_s: float = FAST.node_s, reply_s: float = FAST.reply_s, task_s: float = FAST.task_s,
    pull_backoff_s: float = FAST.pull_backoff_s, heartbeat_s: float = FAST.heartbeat_s, idle_cap_s: float = FAST.idle_cap_s,
) -> None:  # fmt: skip
    """Shorten the SuperNode's waits and heartbeat in this process (and SuperExec's poll, via Flower's env var)."""
    check_supernode_targets()
    _supernode_module().time = ShortSleeps({IDLE_SLEEP_S: node_s, REPLY_SLEEP_S: reply_s}, idle_cap_s)
    shorten_object_pull_backoff(pull_backoff_s)
    shorten_heartbeat(heartbeat_s)
    # In `--isolation subprocess` the SuperNode starts flower-superexec, which reads this.
    os.environ.setdefault(TASK_POLL_ENV, str(task_s))


def wake_launcher_on_message(wake_name: str | None) -> None:
    """After each message the SuperNode stores (its task created), wake the launcher listening on ``wake_name``.

    Wraps ``_pull_and_store_message`` as found (the approval gate's wrapper, if installed first,
    still runs inside: the wake-up follows the gate's verdict, it never replaces it).
    """
    from client.task_wakeup import WakeSender

    module = _supernode_module()
    inner = getattr(module, "_pull_and_store_message", None)
    if inner is None or "_pull_and_store_message(" not in inspect.getsource(module.start_client_internal):
        raise FlowerInternalsChanged("flwr.supernode.start_client_internal no longer calls `_pull_and_store_message`")
    sender = WakeSender(wake_name)

    def pull_store_and_wake(*args: object, **kwargs: object) -> object:
        run_id = inner(*args, **kwargs)
        if run_id is not None:
            sender.wake()
        return run_id

    module._pull_and_store_message = pull_store_and_wake


def run_fast_supernode(argv: Sequence[str], *, node_s: float = FAST.node_s, reply_s: float = FAST.reply_s, task_s: float = FAST.task_s) -> None:
    """Run ``flower-supernode ARGV`` (Flower's own main) with short polls; does not return until it exits."""
    from flwr.supernode.cli import flower_supernode

    apply_flower_env()
    apply_short_polls(node_s, reply_s, task_s)
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m client.fast_supernode",
        description="flower-supernode with short polls; every other argument goes to flower-supernode.",
        allow_abbrev=False,
    )
    parser.add_argument("--poll-interval", type=float, default=FAST.node_s, help="seconds between pulls from the SuperLink when idle (Flower: 3)")
    parser.add_argument("--reply-poll-interval", type=float, default=FAST.reply_s, help="seconds between checks for the ClientApp's reply (Flower: 0.5)")
    parser.add_argument("--task-poll-interval", type=float, default=FAST.task_s, help="SuperExec's task poll in --isolation subprocess (Flower: 1)")
    ours, rest = parser.parse_known_args(argv)
    run_fast_supernode(rest, node_s=ours.poll_interval, reply_s=ours.reply_poll_interval, task_s=ours.task_poll_interval)


if __name__ == "__main__":
    main()
