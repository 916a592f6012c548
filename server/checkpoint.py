"""Server checkpoints: after every round, everything needed to continue the study.

A consortium study runs for hours; a coordinator that restarts must neither
lose the rounds already paid for (in compute and in the sites' privacy budgets)
nor silently start over. After each completed round the server writes
``RUN_DIR/checkpoint.pt``: the global model, the strategy's own state (FedAdam's
moments ``m_t``/``v_t``, FedOpt's ``current_weights``), the round, the metrics
history and failures, the pooled standardisation, the random generators' state
and a hash of the study. The file is replaced atomically (write, fsync,
rename), so a crash leaves either the previous round's checkpoint or this one.

Resuming (``fedhelix simulate --resume RUN_DIR``, or run config ``resume`` for a
deployed ServerApp) refuses a checkpoint written for another study. The file is
read with ``torch.load(weights_only=True)``: tensors and plain data only, never
arbitrary pickled objects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.config import StudyConfig
from shared.errors import FedhelixError
from shared.params import NDArrays

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 1
# Strategy attributes that carry state across rounds (Flower's FedOpt family).
STRATEGY_STATE = ("current_weights", "m_t", "v_t")


class CheckpointError(FedhelixError):
    """A checkpoint is missing, unreadable or belongs to another study."""


@dataclass
class Checkpoint:
    """The server's state after ``round`` completed rounds."""

    study: str
    study_hash: str
    round: int
    weights: NDArrays
    strategy_state: dict[str, NDArrays] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)  # the recorder's per-round history
    failures: list[dict[str, Any]] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    normalization: dict[str, list[float]] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)


def study_hash(study: StudyConfig) -> str:
    """SHA-256 of everything that defines the study (not where its files happen to live)."""
    fields = dataclasses.asdict(study)
    fields.pop("path", None)
    fields["sites"] = [s.name for s in study.sites]
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- strategy and RNG state


def _unwrap(strategy: Any) -> Any:
    """The Flower strategy holding the state (inside Flower's DP wrapper, if any)."""
    inner = getattr(strategy, "strategy", None)
    return inner if inner is not None and not any(hasattr(strategy, k) for k in STRATEGY_STATE) else strategy


def strategy_state(strategy: Any) -> dict[str, NDArrays]:
    """The strategy's state across rounds, as arrays (empty for stateless FedAvg-like strategies)."""
    target = _unwrap(strategy)
    state = {}
    for name in STRATEGY_STATE:
        value = getattr(target, name, None)
        if value is not None:
            state[name] = [np.array(a, copy=True) for a in value]
    return state


def restore_strategy_state(strategy: Any, state: dict[str, NDArrays]) -> None:
    target = _unwrap(strategy)
    for name, arrays in state.items():
        setattr(target, name, [np.array(a, copy=True) for a in arrays])


def rng_state() -> dict[str, Any]:
    """State of the generators the coordinator draws from (Python's, NumPy's global, torch's)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    if not state:
        return
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


# --------------------------------------------------------------------------- files


def _tensors(arrays: NDArrays) -> list[torch.Tensor]:
    return [torch.from_numpy(np.array(a, copy=True)) for a in arrays]


def _arrays(tensors: list[torch.Tensor]) -> NDArrays:
    return [t.numpy() for t in tensors]


def save_checkpoint(run_dir: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``RUN_DIR/checkpoint.pt`` atomically and durably."""
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT_FILE
    tmp = run_dir / f".{CHECKPOINT_FILE}.tmp"
    meta = {k: v for k, v in dataclasses.asdict(ckpt).items() if k not in ("weights", "strategy_state", "rng")}
    payload = {
        "format": FORMAT,
        "meta": json.dumps(meta, sort_keys=True),
        "weights": _tensors(ckpt.weights),
        "strategy_state": {k: _tensors(v) for k, v in ckpt.strategy_state.items()},
        "rng_torch": ckpt.rng.get("torch", torch.empty(0, dtype=torch.uint8)),
        "rng": json.dumps({k: v for k, v in ckpt.rng.items() if k != "torch"}),
    }
    with tmp.open("wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(run_dir: str | Path, study: StudyConfig) -> Checkpoint:
    """The last complete round's checkpoint in ``run_dir``, refused if it belongs to another study."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {run_dir} (expected {CHECKPOINT_FILE}); nothing to resume, start the study without --resume")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(payload["meta"])
        rng = json.loads(payload["rng"])
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}); restore it or start the study afresh") from None
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {payload.get('format')}, this fedhelix reads format {FORMAT}")
    expected = study_hash(study)
    if meta["study_hash"] != expected:
        raise CheckpointError(
            f"checkpoint {path} belongs to study '{meta['study']}' (hash {meta['study_hash'][:12]}), not to this "
            f"study '{study.name}' (hash {expected[:12]}); resume with the study file that started the run"
        )
    if rng:
        rng["torch"] = payload["rng_torch"]
    return Checkpoint(
        **meta,
        weights=_arrays(payload["weights"]),
        strategy_state={k: _arrays(v) for k, v in payload["strategy_state"].items()},
        rng=rng,
    )


# --------------------------------------------------------------------------- the server's side


def resume_state(ckpt: Checkpoint, plan: Any, model: torch.nn.Module) -> Any:
    """The plan to continue with: the checkpoint's agreed features and pooled standardisation.

    The statistics round is not repeated (its result is in the checkpoint); sites
    whose encoded features changed since the checkpoint are refused.
    """
    from shared.models import federated_keys
    from shared.params import set_weights

    if ckpt.features and list(plan.features) != list(ckpt.features):
        raise CheckpointError(
            f"the sites' features changed since the checkpoint of round {ckpt.round} ({len(ckpt.features)} then, "
            f"{len(plan.features)} now); a study cannot resume on different data"
        )
    set_weights(model, ckpt.weights, federated_keys(model))
    return dataclasses.replace(plan, normalization=ckpt.normalization) if ckpt.normalization else plan


class Checkpointer:
    """Called after every completed round: writes the run directory's checkpoint.

    Built after the strategy; with a checkpoint to resume from, it restores the
    strategy's state and the generators first, so round k+1 starts exactly where
    the interrupted run would have.
    """

    def __init__(self, run_dir: str | Path, study: StudyConfig, plan: Any, recorder: Any, strategy: Any, resume: Checkpoint | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.study = study
        self.hash = study_hash(study)
        self.plan = plan
        self.recorder = recorder
        self.strategy = strategy
        self.start_round = resume.round + 1 if resume else 1
        if resume is not None:
            restore_strategy_state(strategy, resume.strategy_state)
            restore_rng(resume.rng)
        else:
            (self.run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)  # never resume into another run's past

    def __call__(self, server_round: int, context: Any) -> None:
        import flwr.compat.common.recorddict_compat as compat
        from flwr.common import parameters_to_ndarrays
        from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

        if not self.recorder.rounds or self.recorder.rounds[-1].get("round") != server_round:
            return  # the round did not complete (no evaluation recorded): keep the previous checkpoint
        record = context.state.array_records[MAIN_PARAMS_RECORD]
        weights = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))
        ckpt = Checkpoint(
            study=self.study.name,
            study_hash=self.hash,
            round=server_round,
            weights=weights,
            strategy_state=strategy_state(self.strategy),
            rounds=self.recorder.rounds,
            failures=self.recorder.failures,
            features=list(self.plan.features),
            normalization=dict(self.plan.normalization),
            rng=rng_state(),
        )
        save_checkpoint(self.run_dir, ckpt)
