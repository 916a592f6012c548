"""Before round 1: every site checks its data against the plan and reports counts.

The reply holds the site name, train/test counts and encoded feature *names*
(never values). The coordinator checks that all sites agree on the features,
fixes their order for the study, and stops with one line per failing site if
any site's data breaks the contract — before any training happens.
"""

from __future__ import annotations

import json
import logging
import time

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Message
from flwr.common import GetPropertiesIns
from flwr.common.constant import MessageTypeLegacy

from server.recorder import SiteInfo
from server.strategy import StudyAborted
from shared.config import StudyConfig
from shared.errors import extract_error_line
from shared.plan import PLAN_KEY, TrainingPlan

log = logging.getLogger("fedhelix.server")


def wait_for_nodes(grid, expected: int, timeout_s: float) -> list[int]:
    """Node ids once ``expected`` nodes are connected, or a clear error after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() > deadline:
            raise StudyAborted(f"only {len(nodes)} of {expected} sites connected within {timeout_s:.0f} s")
        time.sleep(0.5)


def handshake(grid, study: StudyConfig, plan: TrainingPlan, timeout_s: float = 300.0) -> list[SiteInfo]:
    """Ask every node for its site's counts and features; validate agreement."""
    nodes = wait_for_nodes(grid, len(study.sites), timeout_s)
    content = compat.getpropertiesins_to_recorddict(GetPropertiesIns({PLAN_KEY: plan.to_json()}))
    messages = [
        Message(content=content, dst_node_id=node, message_type=MessageTypeLegacy.GET_PROPERTIES, group_id="0")
        for node in nodes
    ]
    sites: list[SiteInfo] = []
    problems: list[str] = []
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            problems.append(extract_error_line(reply.error.reason) or reply.error.reason)
            continue
        props = compat.recorddict_to_getpropertiesres(reply.content).properties
        sites.append(
            SiteInfo(
                node_id=reply.metadata.src_node_id,
                name=str(props["site"]),
                n_train=int(props["n_train"]),
                n_test=int(props["n_test"]),
                features=json.loads(str(props["features"])),
                warnings=json.loads(str(props.get("warnings", "[]"))),
                normalize=str(props.get("normalize", "site")),
                indicators=json.loads(str(props.get("indicators", "[]"))),
                labels=json.loads(str(props.get("labels", "[]"))),
                candidates=json.loads(str(props.get("candidates", "[]"))),
                join_dropped=int(props.get("join_dropped", 0)),
            )
        )
    silent = len(nodes) - len(sites) - len(problems)
    if silent > 0 and not problems:  # every site must answer: the handshake fixes features and SecAgg+ parameters
        raise StudyAborted(f"{silent} of {len(nodes)} site(s) did not answer the handshake within the round timeout; nothing was trained")
    if problems:
        raise StudyAborted(f"{len(problems)} site(s) could not join the study, nothing was trained: " + " | ".join(problems))
    expected = [s.name for s in study.sites]
    names = [s.name for s in sites]
    unknown = sorted(set(names) - set(expected))
    if unknown:
        raise StudyAborted(f"unknown site(s) {', '.join(unknown)} answered; the study lists {', '.join(expected)}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise StudyAborted(f"site name(s) {', '.join(twice)} answered from more than one node")
    for site in sites:
        site.order = expected.index(site.name)
    sites.sort(key=lambda s: s.order)  # the study's first site fixes the feature order
    reference = sites[0]
    # With [omics] selection, omics features may differ by site (the common ones are candidates).
    agreed = (lambda s: set(s.features) - set(s.candidates)) if study.omics is not None else (lambda s: set(s.features))
    for site in sites[1:]:
        if agreed(site) != agreed(reference):
            only_here = sorted(agreed(site) - agreed(reference))[:3]
            only_there = sorted(agreed(reference) - agreed(site))[:3]
            raise StudyAborted(
                f"site '{site.name}' and site '{reference.name}' disagree on features "
                f"(only at '{site.name}': {only_here}; only at '{reference.name}': {only_there})"
            )
    for site in sites[1:]:
        if site.labels != reference.labels:  # one model output per label: same tasks, same order
            raise StudyAborted(f"site '{site.name}' and site '{reference.name}' disagree on label columns ({site.labels} vs {reference.labels})")
    for site in sites:
        log.info("site '%s': %d train / %d test examples, %d features", site.name, site.n_train, site.n_test, len(site.features))
        for warning in site.warnings:
            log.warning("site '%s': %s", site.name, warning)
    for site in sites:
        # put each site's per-feature indicator flags in the agreed (reference) order
        flags = dict(zip(site.features, site.indicators))
        site.flags = flags
        site.indicators = [bool(flags.get(f, False)) for f in reference.features]
    return sites
