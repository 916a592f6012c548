"""The fast deployed-round path: warm launcher hazards, Flower patch targets, short-poll grid."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, RecordDict

from client import fast_supernode
from client.launcher import APP_PACKAGES, fork_task, forget_app_modules, preload, read_secret_file, write_secret_file
from server.short_poll import ShortPollGrid, poll_interval, send_and_receive
from shared.errors import ConfigError
from shared.flower_polling import PollIntervals, check_object_pull_backoff, shorten_object_pull_backoff


def _draws_in_children(n: int) -> list[bytes]:
    """Fork ``n`` children like the launcher does; each reports its first torch, NumPy and random draws."""
    import random

    torch.manual_seed(0), np.random.seed(0), random.seed(0)  # the parent's state every child inherits
    results = []
    for _ in range(n):
        read, write = os.pipe()

        def task(write: int = write) -> None:
            draws = torch.rand(4).numpy().tobytes() + np.random.rand(4).tobytes() + random.random().hex().encode()
            os.write(write, draws)

        pid = fork_task(task)
        os.close(write)
        with os.fdopen(read, "rb") as fh:
            results.append(fh.read())
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    return results


def test_forked_children_draw_different_random_numbers() -> None:
    draws = _draws_in_children(3)
    assert len(draws[0]) > 64
    assert len(set(draws)) == 3, "forked task processes share their parent's RNG state"
    # and none of them replays the parent's seeded stream
    torch.manual_seed(0)
    assert not any(d.startswith(torch.rand(4).numpy().tobytes()) for d in draws)


def test_child_forgets_the_apps_own_modules_and_reports_its_exit_code() -> None:
    import client.trainer  # noqa: F401  (the parent has app code loaded, e.g. the launcher itself)

    read, write = os.pipe()

    def task() -> None:
        os.write(write, ",".join(m for m in sys.modules if m.split(".")[0] in APP_PACKAGES).encode() or b"-")
        raise SystemExit(3)

    pid = fork_task(task)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        loaded = fh.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3
    assert loaded == "-", f"child still had app modules: {loaded}"
    assert "client.trainer" in sys.modules  # only the child forgot them


CHILD_THREADS_SCRIPT = """
import os, torch
from client.launcher import fork_task, preload
preload(["torch"])
assert torch.get_num_threads() == 1
read, write = os.pipe()
def task():
    x = torch.randn(256, 256)
    os.write(write, f"{torch.get_num_threads()} {float((x @ x).sum()) != 0}".encode())
pid = fork_task(task, threads=2)
os.close(write)
with os.fdopen(read, "rb") as fh:
    print(fh.read().decode())
os.waitpid(pid, 0)
"""


def test_child_runs_torch_with_its_own_threads_after_a_single_thread_parent(root: Path) -> None:
    # A fresh interpreter, as the launcher is: this test process has run torch's
    # multi-thread pool already, and a fork after that is exactly the hang we avoid.
    import subprocess

    done = subprocess.run([sys.executable, "-c", CHILD_THREADS_SCRIPT], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "2 True"


def test_preload_refuses_the_apps_own_modules() -> None:
    with pytest.raises(ValueError, match="app's own module"):
        preload(["shared.models"])
    assert forget_app_modules is not None


def test_secret_file_is_owner_only_and_checked(tmp_path: Path) -> None:
    path = write_secret_file(tmp_path / "node.secret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(read_secret_file(path)) == 32
    assert read_secret_file(path) != read_secret_file(write_secret_file(tmp_path / "other.secret"))
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_secret_file(path)
    (tmp_path / "empty").touch(mode=0o600)
    with pytest.raises(ConfigError, match="empty"):
        read_secret_file(tmp_path / "empty")
    with pytest.raises(ConfigError, match="cannot be read"):
        read_secret_file(tmp_path / "missing")


# -- Flower's private waits: the targets must exist (a Flower upgrade fails loudly) ----------
def test_supernode_sleep_targets_exist_and_are_shortened(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal as sci

    fast_supernode.check_supernode_targets()
    monkeypatch.setattr(sci, "time", sci.time)  # restored after the test
    monkeypatch.delenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", raising=False)
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        monkeypatch.setitem(fn.__kwdefaults__, "initial_backoff", fn.__kwdefaults__["initial_backoff"])
    import importlib

    heartbeat_modules = [importlib.import_module(name) for name in fast_supernode.HEARTBEAT_MODULES]
    for module in heartbeat_modules:
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", module.HEARTBEAT_DEFAULT_INTERVAL)
    fast_supernode.apply_short_polls(node_s=0.01, reply_s=0.002)
    # A crashed node is offline (and may rejoin) 2 x 10 s after its last heartbeat, not 2 x 30 s.
    assert [m.HEARTBEAT_DEFAULT_INTERVAL for m in heartbeat_modules] == [10.0, 10.0]
    assert fast_supernode.shorten_heartbeat(1) == 10.0  # never below what the SuperLink accepts
    started = time.monotonic()
    sci.time.sleep(3)
    sci.time.sleep(0.5)
    assert time.monotonic() - started < 0.5
    assert sci.time.time() == pytest.approx(time.time(), abs=1)  # everything else is the real time module
    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == pytest.approx(0.05)
    assert os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.05"
    fast_supernode.check_supernode_targets()  # applying twice is fine


def test_a_moved_target_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal as sci

    from shared.flower_polling import FlowerInternalsChanged

    monkeypatch.setattr(sci, "_push_messages", lambda *a, **k: None)
    with pytest.raises(FlowerInternalsChanged, match="_push_messages"):
        fast_supernode.check_supernode_targets()
    check_object_pull_backoff()
    from flwr.supercore.inflatable import inflatable_utils

    monkeypatch.setattr(inflatable_utils.pull_objects, "__kwdefaults__", {"max_time": 1})
    with pytest.raises(FlowerInternalsChanged, match="initial_backoff"):
        shorten_object_pull_backoff()
    from flwr.supercore import heartbeat

    monkeypatch.delattr(heartbeat, "HEARTBEAT_DEFAULT_INTERVAL")
    with pytest.raises(FlowerInternalsChanged, match="flwr.supercore.heartbeat"):
        fast_supernode.shorten_heartbeat()


def test_http_grid_still_sleeps_three_seconds_between_pulls() -> None:
    """What ShortPollGrid replaces: if Flower changes this loop, revisit server/short_poll.py."""
    import inspect

    from flwr.superlink.grid.http_grid import HttpGrid

    source = inspect.getsource(HttpGrid.send_and_receive)
    assert "time.sleep(3)" in source and "push_messages" in source and "pull_messages" in source


def test_poll_intervals_are_validated() -> None:
    with pytest.raises(ValueError, match="node_s"):
        PollIntervals(node_s=0)


# -- the ServerApp's short-poll grid -------------------------------------------------------
@pytest.fixture(autouse=True)
def _run_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are created inside a run; pretend to be in run 1."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)  # the server side
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class FakeGrid:
    """Replies to each pushed message after ``delay`` seconds (one node per message, some never reply)."""

    def __init__(self, delay: float, silent: set[int] = frozenset()) -> None:
        self.delay, self.silent, self.pulls = delay, silent, 0
        self._pushed: dict[str, tuple[Message, float]] = {}
        self._delivered: set[str] = set()

    def create_message(self, dst: int, value: float) -> Message:
        return Message(RecordDict({"x": ArrayRecord([np.full(3, value)])}), dst_node_id=dst, message_type="train")

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self._pushed)}-{i}"
            self._pushed[msg.metadata.message_id] = (msg, time.time())
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for mid in list(message_ids):
            msg, at = self._pushed[mid]
            if mid in self._delivered or msg.metadata.dst_node_id in self.silent or time.time() - at < self.delay:
                continue
            self._delivered.add(mid)
            doubled = ArrayRecord([msg.content["x"].to_numpy_ndarrays()[0] * 2])
            reply = Message(RecordDict({"x": doubled}), reply_to=msg)
            out.append(reply)
        return out


def _stock_send_and_receive(grid: FakeGrid, messages, timeout, monkeypatch: pytest.MonkeyPatch):
    """Flower's HttpGrid loop, run on the fake grid (its 3 s sleep shortened to keep the test quick)."""
    import flwr.superlink.grid.http_grid as http_grid

    monkeypatch.setattr(http_grid, "time", fast_supernode.ShortSleeps({3: 0.05}))
    return list(http_grid.HttpGrid.send_and_receive(grid, messages, timeout=timeout))


def _summary(replies: list[Message]) -> list[tuple[int, list[float]]]:
    return sorted((r.metadata.src_node_id, r.content["x"].to_numpy_ndarrays()[0].tolist()) for r in replies)


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_short_poll_returns_the_same_replies_as_flowers_loop(timeout, monkeypatch: pytest.MonkeyPatch) -> None:
    stock_grid, fast_grid = FakeGrid(0.2), FakeGrid(0.2)
    stock = _stock_send_and_receive(stock_grid, [stock_grid.create_message(n, n) for n in (1, 2, 3)], timeout, monkeypatch)
    fast = send_and_receive(fast_grid, [fast_grid.create_message(n, n) for n in (1, 2, 3)], timeout=timeout, interval=0.01)
    assert _summary(fast) == _summary(stock) == [(1, [2.0] * 3), (2, [4.0] * 3), (3, [6.0] * 3)]
    assert fast_grid.pulls > 3  # it really polled until the replies were ready


def test_short_poll_keeps_timeout_semantics() -> None:
    grid = FakeGrid(0.05, silent={2})
    started = time.time()
    replies = send_and_receive(grid, [grid.create_message(n, n) for n in (1, 2)], timeout=0.5, interval=0.1)
    took = time.time() - started
    assert _summary(replies) == [(1, [2.0] * 3)]  # the silent node's reply is simply missing
    assert 0.45 <= took < 1.5
    grid = FakeGrid(0.0)
    assert send_and_receive(grid, [grid.create_message(1, 1)], timeout=0) == []  # like Flower: no pull at all


def test_short_poll_grid_wraps_and_delegates() -> None:
    grid = FakeGrid(0.05)
    wrapped = ShortPollGrid(grid, interval=0.01)
    assert wrapped.create_message(4, 1).metadata.dst_node_id == 4  # delegated
    assert _summary(list(wrapped.send_and_receive([wrapped.create_message(4, 1)]))) == [(4, [2.0] * 3)]


def test_poll_interval_run_config() -> None:
    assert poll_interval({}) == pytest.approx(0.1)  # on by default
    assert poll_interval({"poll-interval": 0.25}) == pytest.approx(0.25)
    assert poll_interval({"poll-interval": 0}) is None  # Flower's stock loop
    with pytest.raises(ConfigError, match="poll-interval"):
        poll_interval({"poll-interval": "fast"})
    with pytest.raises(ConfigError, match="out of range"):
        poll_interval({"poll-interval": -1})


def test_idle_polls_back_off_and_work_makes_them_quick_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Five idle nodes at 0.1 s kept a SuperLink at 62% of a core; idle polls now slow to 0.5 s."""
    from shared.flower_polling import IdleBackoff

    backoff = IdleBackoff(0.1, 0.5)
    assert [backoff.next() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    assert backoff.next() == 0.1

    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    sleeps = fast_supernode.ShortSleeps({3: 0.1, 0.5: 0.02}, idle_cap_s=0.5)
    for _ in range(4):
        sleeps.sleep(3)  # empty pulls in a row
    sleeps.sleep(0.5)  # waiting for a ClientApp's reply: a message is being handled
    sleeps.sleep(3)
    assert slept == [0.1, 0.2, 0.4, 0.5, 0.02, 0.1]


# -- the SuperNode wakes its launcher when a message arrives ----------------------------------
def test_a_wake_up_ends_the_launchers_wait_at_once_and_only_once() -> None:
    from client.task_wakeup import WakeListener, WakeSender, new_wake_name

    name = new_wake_name()
    listener, sender = WakeListener(name), WakeSender(name)
    try:
        assert listener.active
        started = time.monotonic()
        assert listener.wait(0.05) is False  # nothing sent: the idle poll's timeout
        assert time.monotonic() - started >= 0.04
        sender.wake()
        sender.wake()  # two messages before the launcher looked: one wake-up, then a poll takes both tasks
        started = time.monotonic()
        assert listener.wait(5.0) is True
        assert time.monotonic() - started < 1.0
        assert listener.wait(0.01) is False  # both consumed
        assert WakeListener(name).active is False  # the name is taken: a second listener only polls
        WakeSender(new_wake_name()).wake()  # nobody listening: no error, the launcher polls anyway
    finally:
        listener.close()
    assert WakeListener(None).active is False


def test_supernode_wakes_the_launcher_only_after_it_stored_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal as sci

    from client.task_wakeup import WakeListener, new_wake_name

    answers = iter([None, 42, None])
    monkeypatch.setattr(sci, "_pull_and_store_message", lambda **_: next(answers))  # restored after the test
    name = new_wake_name()
    listener = WakeListener(name)
    try:
        fast_supernode.wake_launcher_on_message(name)
        assert sci._pull_and_store_message() is None  # nothing pulled: no wake-up
        assert listener.wait(0.05) is False
        assert sci._pull_and_store_message() == 42  # a message (its task created): wake-up
        assert listener.wait(1.0) is True
        assert sci._pull_and_store_message() is None
        assert listener.wait(0.05) is False
    finally:
        listener.close()


def test_prepare_node_gives_the_supernode_and_its_launcher_one_fresh_wake_name(tmp_path: Path) -> None:
    from bench.round_overhead import write_site_file
    from client.node import prepare_node
    from tests.e2e.deployed import free_port
    from server.provision import ConsortiumConfig, provision

    provision(ConsortiumConfig(name="wake", server_address="127.0.0.1:9", sites=("hospital_a",)), tmp_path / "kits")
    site = write_site_file(tmp_path, "hospital_a")

    def wake_names() -> tuple[str, str]:
        plan = prepare_node(tmp_path / "kits" / "hospital_a", site, port=free_port(), probe=False)
        assert plan.launcher is not None
        node, launcher = (cmd[cmd.index("--wake-name") + 1] for cmd in (plan.command, plan.launcher))
        assert plan.command.index("--wake-name") < plan.command.index("--")  # ours, not Flower's
        return node, launcher

    first, second = wake_names(), wake_names()
    assert first[0] == first[1] and second[0] == second[1]
    assert first[0] != second[0]  # a fresh, unguessable name each start
    assert "--wake-name" not in prepare_node(tmp_path / "kits" / "hospital_a", site, port=free_port(), probe=False, fast=False).command


def test_child_writes_the_bytecode_of_the_modules_it_compiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without it every task recompiled the whole app (~0.7 s CPU per message) under PYTHONDONTWRITEBYTECODE."""
    package = tmp_path / "fabapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("VALUE = 7\n")
    monkeypatch.setattr(sys, "dont_write_bytecode", True)

    def task() -> None:
        sys.path.insert(0, str(tmp_path))
        import fabapp.mod

        assert fabapp.mod.VALUE == 7

    pid = fork_task(task)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert any(p.name.startswith("mod.") for p in (package / "__pycache__").glob("*.pyc"))
    assert sys.dont_write_bytecode is True  # only the child changed
