"""The site builds its training plan from the study it approved, never from a message.

Every privacy-relevant value (model and size, DP on/off, target epsilon, clipping,
batch size, local steps, rounds, optimiser, learning rate, secure aggregation and
its bounds, the omics rules) comes from the approved study file. The coordinator
still sends its plan with every request; the site recomputes the plan from the
approved study and refuses the request if anything differs. What the coordinator
legitimately contributes is checked against facts the site can verify itself:

* ``features``: the agreed order; the data contract refuses any list that is not a
  permutation of the site's own encoded features (or, with ``[omics]`` selection,
  one that keeps more omics features than the study's ``top_k``);
* ``labels``: the site's own label columns, in some order;
* ``normalization``: pooled means and scales from the secure statistics round,
  finite, one per feature, scales positive;
* ``candidates``: the omics features asked about in the selection round;
* ``pos_weight``, only where the study says ``pos_weight = "balanced"``: the pooled
  negatives/positives per label from the secure label round, finite and positive.

Where the approved study comes from: a simulation is given the study file by the
researcher; a SuperNode started by hand (benchmarks) names it in its own node config
``approved-study``; a deployed node gets the study inside the signed run config, which its
approval gate (:mod:`client.node_gate`) has checked against the admin's signature
and the site's approvals before this code could run, and which is checked here
once more against the approvals file.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from flwr.app import Context

from client.approval import approvals_path, read_approvals
from client.site_data import SITE_CONFIG_KEY
from shared.approval import STUDY_B64_KEY, decode_study, study_digest
from shared.config import SiteConfig, StudyConfig, load_study, parse_study
from shared.errors import RequestRefused
from shared.paths import resolve_path
from shared.plan import TrainingPlan

APPROVED_STUDY_KEY = "approved-study"  # node config (set by the site's IT, never the coordinator)
FROM_COORDINATOR = ("features", "labels", "normalization", "candidates")
MIN_SCALE = 1e-6  # a pooled scale below this would blow one feature up (and underflows float32 further down)
MAX_POOLED = 1e30  # float32 stays finite
MAX_POS_WEIGHT = 1e6  # as the study's own pos_weight is bounded


class PlanRefused(RequestRefused):
    """A request's plan differs from what the approved study allows."""


def approved_study(context: Context, site: SiteConfig, study: str | Path | StudyConfig | None = None) -> StudyConfig:
    """The study this site agreed to: the researcher's study in simulation, the signed and approved one deployed."""
    if isinstance(study, StudyConfig):
        return study
    if study is not None:
        return _study_file(str(resolve_path(str(study))))
    if APPROVED_STUDY_KEY in context.node_config:  # a SuperNode run by hand, without the gate: its IT names the study
        return _study_file(str(resolve_path(str(context.node_config[APPROVED_STUDY_KEY]))))
    encoded = str(context.run_config.get(STUDY_B64_KEY, "") or "")
    if SITE_CONFIG_KEY in context.node_config:  # a deployed node: only the signed, approved study counts
        if not encoded:
            raise PlanRefused(f"site '{site.name}' refused: the run carries no signed study")
        study_bytes = decode_study(encoded)
        digest = study_digest(study_bytes)
        if not any(a.study_sha256 == digest for a in read_approvals(approvals_path(site))):
            raise PlanRefused(f"site '{site.name}' refused: study sha256 {digest[:12]} is not among its approvals")
        return _study_bytes(study_bytes)
    if encoded:
        return _study_bytes(decode_study(encoded))
    return _study_file(str(resolve_path(str(context.run_config.get("study", "")))))


@lru_cache(maxsize=8)
def _study_file(path: str) -> StudyConfig:
    return load_study(Path(path))


@lru_cache(maxsize=8)
def _study_bytes(study_bytes: bytes) -> StudyConfig:
    return parse_study(tomllib.loads(study_bytes.decode("utf-8")), source="approved study")


def checked_plan(study: StudyConfig, sent_json: str, site: str) -> TrainingPlan:
    """The plan of the approved study, completed with what the coordinator may choose, or :class:`PlanRefused`."""
    try:
        sent = json.loads(sent_json)
        if not isinstance(sent, dict):
            raise ValueError
        features, labels = list(map(str, sent.get("features", []))), list(map(str, sent.get("labels", [])))
    except (ValueError, TypeError):
        raise PlanRefused(f"site '{site}' refused a request whose plan is not a plan") from None
    if len(set(features)) != len(features) or len(set(labels)) != len(labels):
        raise PlanRefused(f"site '{site}' refused a feature or label list that names a column twice")
    expected = TrainingPlan.from_study(study, features, labels)
    wanted = json.loads(expected.to_json())
    chosen = FROM_COORDINATOR + (("pos_weight",) if study.pos_weight == "balanced" else ())
    differ = sorted(k for k in set(wanted) | set(sent) if k not in chosen and wanted.get(k) != sent.get(k))
    if differ:
        shown = "; ".join(f"{k}: asked {sent.get(k)!r}, approved {wanted.get(k)!r}" for k in differ[:4])
        raise PlanRefused(f"site '{site}' refused a request for study '{study.name}' that differs from the approved study in {', '.join(differ)} ({shown})")
    normalization = sent.get("normalization") or {}
    candidates = sent.get("candidates") or []
    if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
        raise PlanRefused(f"site '{site}' refused: malformed candidate list")
    if normalization:
        _check_normalization(normalization, len(features), site)
    pos_weight = sent.get("pos_weight") or [] if study.pos_weight == "balanced" else expected.pos_weight
    _check_pos_weight(pos_weight, len(labels), site)
    return replace(expected, normalization=normalization, candidates=candidates, pos_weight=[float(v) for v in pos_weight])


def _check_pos_weight(pos_weight: object, n_labels: int, site: str) -> None:
    """A coordinator's balanced pos_weight: one finite positive weight per label (or one for all)."""
    ok = isinstance(pos_weight, list) and len(pos_weight) in (0, 1, max(n_labels, 1))
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= MAX_POS_WEIGHT for v in pos_weight)
    if not ok:
        raise PlanRefused(f"site '{site}' refused a pos_weight that is not one finite positive weight per label")


def _check_normalization(normalization: object, n_features: int, site: str) -> None:
    """Pooled statistics must be one finite mean and one positive scale per agreed feature."""
    ok = isinstance(normalization, dict) and set(normalization) == {"mean", "scale"}
    if ok:
        mean, scale = normalization["mean"], normalization["scale"]
        ok = isinstance(mean, list) and isinstance(scale, list) and len(mean) == len(scale) == n_features
        # checked as the float32 the site computes with: 1e-300 would become 0, 1e300 infinity
        ok = ok and all(isinstance(v, (int, float)) and math.isfinite(v) and abs(v) < MAX_POOLED for v in mean)
        ok = ok and all(isinstance(v, (int, float)) and math.isfinite(v) and MIN_SCALE <= v < MAX_POOLED for v in scale)
    if not ok:
        raise PlanRefused(f"site '{site}' refused pooled normalisation that is not one finite mean and one positive scale per feature")


def check_labels(plan: TrainingPlan, own: list[str], site: str) -> None:
    """The coordinator orders the label columns; it cannot add or drop one."""
    if plan.labels and sorted(plan.labels) != sorted(own):
        raise PlanRefused(f"site '{site}' refused label columns {plan.labels}; its own are {own}")


def check_selected(plan: TrainingPlan, omics_kept: int, site: str) -> None:
    """With ``[omics] top_k``, a model over more omics features than the study selects is refused."""
    top_k = (plan.selection or {}).get("top_k")
    if top_k and omics_kept > int(top_k):
        raise PlanRefused(f"site '{site}' refused a feature list with {omics_kept} omics features; the approved study selects at most {top_k}")
