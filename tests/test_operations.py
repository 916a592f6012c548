"""Dropouts and dashboards: the round timeout reports silent sites; TensorBoard gets every round."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from server.grid_tap import TappedGrid
from server.recorder import RunRecorder, SiteInfo
from server.tracking import TensorBoardTracker, add_trackers


def _message(node: int, group: str = "3", kind: str = "train"):
    meta = SimpleNamespace(dst_node_id=node, src_node_id=node, message_type=kind, group_id=group, message_id=f"id-{node}", reply_to_message_id=f"id-{node}")
    return SimpleNamespace(metadata=meta, has_error=lambda: False)


class SlowGrid:
    """Answers only for some nodes, as a real grid does when others miss the timeout."""

    def __init__(self, answering: set[int]) -> None:
        self.answering = answering
        self.timeouts: list[float | None] = []

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        return [_message(m.metadata.dst_node_id) for m in messages if m.metadata.dst_node_id in self.answering]


def test_sites_missing_the_round_timeout_are_reported_dropped_and_the_rest_returned(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path, "binary")
    recorder.set_sites([SiteInfo(1, "alpha", 10, 5, []), SiteInfo(2, "beta", 10, 5, []), SiteInfo(3, "gamma", 10, 5, [])])
    grid = SlowGrid({1, 3})
    tapped = TappedGrid(grid, recorder.observe_reply, timeout=30.0)

    replies = tapped.send_and_receive([_message(n) for n in (1, 2, 3)])

    assert [r.metadata.src_node_id for r in replies] == [1, 3]
    assert grid.timeouts == [30.0]  # Flower's legacy fit/evaluate steps pass none: the study's applies
    assert [(f["round"], f["site"], f["kind"]) for f in recorder.failures] == [(3, "beta", "dropped")]
    assert "no reply within the round timeout of 30 s" in recorder.failures[0]["reason"]
    tapped.send_and_receive([_message(2)], timeout=5.0)  # SecAgg+ passes its own stage timeout
    assert grid.timeouts[-1] == 5.0 and len(recorder.failures) == 2


def test_a_node_the_superlink_reports_offline_is_named_and_dropped(tmp_path: Path, monkeypatch) -> None:
    """Flower's SuperLink answers for a node without heartbeats; the reply comes from the SuperLink itself."""
    from flwr.app import Message, RecordDict
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
    from flwr.supercore.task_identity import TaskIdentity

    for attribute in ("_run_id", "_task_id", "_node_id"):  # what a ServerApp process has set
        monkeypatch.setattr(TaskIdentity, attribute, 1)

    def instruction(node: int) -> Message:
        message = Message(RecordDict(), dst_node_id=node, message_type="train", group_id="4")
        message.metadata.__dict__["_message_id"] = f"id-{node}"  # as Flower's grids do when they push
        return message

    class OfflineGrid:
        def send_and_receive(self, messages, *, timeout=None):
            sent = list(messages)
            ok = Message(RecordDict(), reply_to=sent[0])
            offline = create_message_error_unavailable_res_message(sent[1].metadata, "node_unavail")
            return [ok, offline]

    recorder = RunRecorder(tmp_path, "binary")
    recorder.set_sites([SiteInfo(1, "alpha", 10, 5, []), SiteInfo(2, "beta", 10, 5, [])])
    replies = TappedGrid(OfflineGrid(), recorder.observe_reply, timeout=60.0).send_and_receive([instruction(1), instruction(2)])
    assert len(replies) == 2 and replies[1].metadata.src_node_id != 2  # written by the SuperLink, not by beta
    assert [(f["round"], f["phase"], f["site"], f["kind"]) for f in recorder.failures] == [(4, "train", "beta", "dropped")]
    assert "went offline" in recorder.failures[0]["reason"]


def test_without_a_timeout_nothing_is_reported_missing(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path, "binary")
    TappedGrid(SlowGrid({1}), recorder.observe_reply).send_and_receive([_message(1), _message(2)])
    assert recorder.failures == []


def test_every_round_reaches_tensorboard_and_a_resume_purges_replayed_rounds(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def entry(rnd: int, auc: float) -> dict:
        return {
            "round": rnd,
            "fit": {"sites": {"alpha": {"train_loss": 0.5, "n": 10}}},
            "evaluate": {"sites": {"alpha": {"roc_auc": auc, "n": 5}}, "mean": {"roc_auc": auc}, "weighted": {"roc_auc": auc}},
            "failures": [{"site": "beta", "kind": "dropped"}] if rnd == 2 else [],
        }

    recorder = RunRecorder(tmp_path / "run", "binary")
    add_trackers(recorder, tmp_path / "run")
    for rnd in (1, 2, 3):
        for listener in recorder.listeners:
            listener(entry(rnd, 0.5 + 0.1 * rnd))
    resumed = TensorBoardTracker(tmp_path / "run" / "tensorboard", start_round=3)  # checkpoint was after round 2
    resumed(entry(3, 0.95))
    resumed.close()

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    mean = [(e.step, round(e.value, 4)) for e in events.Scalars("mean/roc_auc")]
    assert mean == [(1, 0.6), (2, 0.7), (3, 0.95)]
    assert [(e.step, e.value) for e in events.Scalars("sites/dropped")] == [(1, 0.0), (2, 1.0), (3, 0.0)]
    assert [e.step for e in events.Scalars("site/alpha/train_loss")] == [1, 2, 3]
