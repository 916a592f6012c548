"""Every bundled study, deployed on real nodes and simulated, compared: ``python bench/deployed_studies.py``.

Each study file under ``studies/`` is staged in a scratch copy of the tree (the nodes write
approvals, ledgers and audit logs beside their site files) and shortened to ``ROUNDS``
round(s) of ``LOCAL_STEPS`` local steps. One consortium runs them all: one ``fedhelix
server`` and a ``fedhelix node`` per site file, started while the studies over that site
file run (a study's coordinator asks every connected node, so only its own sites are up).
Each study runs deployed (``fedhelix run``: signed, approved, gated) and simulated
(:func:`server.simulate.simulate`) from the same file; the final model and per-site
metrics must agree: to float tolerance, or within the SecAgg+ quantisation bound.

DP studies draw their noise from the OS at a real node (reproducible noise is refused
there by design), so they are compared through their non-DP twin: the same study with
``[privacy] dp = false``.

Records ``deployed_studies_passing`` / ``deployed_studies_total`` (and the wall time) in
``bench/results.json``; ``tests/e2e/test_deployed_studies.py`` asserts the same comparison.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROUNDS = 1
LOCAL_STEPS = 3
FLOAT_TOLERANCE = 1e-5  # same seeds, same data order: only the order of float sums may differ


@dataclass(frozen=True)
class Case:
    """One bundled study, staged for a short run."""

    source: Path  # the bundled study file
    study: Path  # its shortened copy in the staged tree
    name: str
    sites: tuple[Path, ...]  # its site files in the staged tree
    secure: bool
    twin: bool  # a DP study, run as its non-DP twin

    @property
    def id(self) -> str:
        return f"{self.source.parent.name}/{self.source.name}"


def bundled_studies(root: Path = ROOT) -> list[Path]:
    """Every study file under ``studies/`` (files with a [study] table), in a stable order."""
    found = []
    for path in sorted((root / "studies").glob("*/*.toml")):
        if "study" in tomllib.loads(path.read_text()):
            found.append(path)
    return found


def shorten(text: str, rounds: int = ROUNDS, local_steps: int = LOCAL_STEPS) -> str:
    """The study text with ``rounds`` rounds of at most ``local_steps`` local steps, and DP off."""
    text = re.sub(r"(?m)^rounds\s*=\s*\d+", f"rounds = {rounds}", text, count=1)
    text = re.sub(r"(?m)^local_steps\s*=\s*(\d+)", lambda m: f"local_steps = {min(int(m.group(1)), local_steps)}", text, count=1)
    return re.sub(r"(?m)^dp\s*=\s*true", "dp = false", text)


def stage(into: Path, root: Path = ROOT, rounds: int = ROUNDS, local_steps: int = LOCAL_STEPS) -> list[Case]:
    """Copy ``studies/`` into ``into`` (``data/`` linked, so site files' relative paths hold) and shorten every study."""
    from shared.config import load_site_ref, load_study

    shutil.copytree(root / "studies", into / "studies")
    (into / "data").symlink_to(root / "data")
    cases = []
    for source in bundled_studies(root):
        staged = into / "studies" / source.relative_to(root / "studies")
        text = source.read_text()
        staged.write_text(shorten(text, rounds, local_steps))
        study = load_study(staged)
        sites = tuple(Path(load_site_ref(ref, study.path).path).resolve() for ref in study.sites)
        twin = bool(tomllib.loads(text).get("privacy", {}).get("dp", False))
        cases.append(Case(source, staged, study.name, sites, study.secure.enabled, twin))  # type: ignore[arg-type]
    return sorted(cases, key=lambda c: _order(c.id, c.sites, into / "studies"))


def _order(case_id: str, sites: tuple[Path, ...], studies: Path) -> tuple[str, int, str]:
    """Studies over the same site files run one after another (their nodes stay up), the widest first."""
    return (min(str(s.relative_to(studies.resolve())) for s in sites), -len(sites), case_id)


def run_order(root: Path = ROOT) -> list[str]:
    """The ids of the bundled studies in the order :func:`stage` runs them."""
    from shared.config import load_site_ref, load_study

    keyed = []
    for source in bundled_studies(root):
        study = load_study(source)
        sites = tuple(Path(load_site_ref(ref, study.path).path).resolve() for ref in study.sites)
        case_id = f"{source.parent.name}/{source.name}"
        keyed.append((_order(case_id, sites, root / "studies"), case_id))
    return [case_id for _, case_id in sorted(keyed)]


@dataclass
class Outcome:
    """A finished run: its report and final model."""

    report: dict
    weights: list[np.ndarray]


def read_outcome(run_dir: Path, report: dict | None = None) -> Outcome:
    import torch

    report = report or json.loads((run_dir / "report.json").read_text())
    saved = torch.load(run_dir / "model.pt", weights_only=False)
    return Outcome(report, [t.numpy().astype(np.float64) for t in saved["state_dict"].values()])


def simulated(case: Case, out: Path) -> Outcome:
    from server.simulate import simulate

    report = simulate(case.study, out, progress=False, check=False)
    return read_outcome(out, report)


def quantisation_bound(report: dict, rounds: int) -> float:
    """How far two SecAgg+ aggregates of the same updates may differ per coordinate (each quantises once per round)."""
    p = report["secure_aggregation_params"]
    n_train = sum(s["n_train"] for s in report["sites"].values())
    per_round = len(report["sites"]) * (2 * p["clipping_range"] / p["quantization_range"]) * p["max_weight"] / n_train
    return 2 * rounds * per_round  # each run's own quantisation error, in opposite directions at worst


def compare(case: Case, deployed: Outcome, simulation: Outcome) -> list[str]:
    """What differs between the deployed and the simulated run of ``case`` (empty: they agree)."""
    problems = []
    for what, outcome in (("deployed", deployed), ("simulated", simulation)):
        if outcome.report.get("status") != "completed":
            problems.append(f"{what} run {outcome.report.get('status')}: {outcome.report.get('error')}")
    if problems:
        return problems
    rounds = len(simulation.report["rounds"])
    if len(deployed.report["rounds"]) != rounds:
        problems.append(f"{len(deployed.report['rounds'])} deployed rounds vs {rounds} simulated")
    bound = quantisation_bound(simulation.report, rounds) if case.secure else 0.0
    if [w.shape for w in deployed.weights] != [w.shape for w in simulation.weights]:
        return problems + ["the final models differ in shape"]
    worst = max(float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(deployed.weights, simulation.weights))
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0 for b in simulation.weights)
    if worst > bound + FLOAT_TOLERANCE * max(1.0, scale):
        problems.append(f"final weights differ by up to {worst:.3g} (allowed {bound + FLOAT_TOLERANCE * max(1.0, scale):.3g})")
    dep, sim = deployed.report["final"]["sites"], simulation.report["final"]["sites"]
    if sorted(dep) != sorted(sim):
        problems.append(f"sites with final metrics differ: deployed {sorted(dep)}, simulated {sorted(sim)}")
    # Metrics of models within the SecAgg+ bound may move a little; without SecAgg+ they are the same numbers.
    tolerance = 1e-2 if case.secure else 1e-6
    for site in sorted(set(dep) & set(sim)):
        for metric, value in sim[site].items():
            other = dep[site].get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if not isinstance(other, (int, float)) or abs(other - value) > tolerance * max(1.0, abs(value)):
                    problems.append(f"site '{site}' {metric}: deployed {other!r}, simulated {value!r}")
            elif other != value:
                problems.append(f"site '{site}' {metric}: deployed {other!r}, simulated {value!r}")
    return problems


@dataclass
class Consortium:
    """One provisioned consortium on loopback: a server, and the nodes of the site files now in use."""

    root: Path
    kits: Path
    server: object
    nodes: dict[Path, subprocess.Popen] = field(default_factory=dict)

    def serve(self, case: Case) -> None:
        """Exactly ``case``'s site files have a node: others are stopped, missing ones started."""
        from tests.e2e.deployed import free_port, start_node, stop_nodes

        wanted = set(case.sites)
        leaving = {p: n for p, n in self.nodes.items() if p not in wanted}
        stop_nodes(leaving)
        for p in leaving:
            del self.nodes[p]
        for site in case.sites:
            if site not in self.nodes:
                name = site_name(site)
                self.nodes[site] = start_node(self.kits / name, site, free_port(), self.root / "logs" / f"node-{name}.log")

    def run(self, case: Case, timeout_s: float = 600) -> Outcome:
        """``fedhelix run`` of the case's study on its nodes."""
        from server.submit import submit_study

        self.serve(case)
        submission = submit_study(case.study, self.kits / "admin", self.root / "runs" / case.id.replace("/", "-"), timeout_s=timeout_s)
        return read_outcome(submission.out_dir)


def site_name(site_file: Path) -> str:
    return str(tomllib.loads(site_file.read_text())["site"]["name"])


@contextmanager
def consortium(root: Path, cases: list[Case]) -> Iterator[Consortium]:
    """Provision every site name of ``cases``, approve each study at each of its site files, start the server."""
    from client.approval import approve
    from server.deployment import start_server
    from server.provision import ConsortiumConfig, provision
    from shared.approval import code_digest_of_project
    from shared.config import load_site
    from tests.e2e.deployed import free_port, stop_nodes

    names = tuple(sorted({site_name(s) for c in cases for s in c.sites}))
    config = ConsortiumConfig(name="bundled", server_address=f"127.0.0.1:{free_port()}", sites=names, link_port=free_port(), admin_address=f"127.0.0.1:{free_port()}")
    kits = root / "kits"
    provision(config, kits)
    digest = code_digest_of_project(ROOT)
    for case in cases:
        for site in case.sites:
            approve(case.study, load_site(site), digest)
    (root / "logs").mkdir(exist_ok=True)
    server = start_server(kits / "server", root / "logs")
    c = Consortium(root, kits, server)
    try:
        yield c
    finally:
        stop_nodes(c.nodes)
        server.stop()  # type: ignore[attr-defined]


def main(only: list[str]) -> None:
    """Run every case (or those whose id contains one of ``only``); record the count only for a full run."""
    import tempfile

    from shared.flower_env import apply_flower_env

    apply_flower_env()
    started = time.monotonic()
    passing, lines = 0, []
    with tempfile.TemporaryDirectory(prefix="deployed-studies-") as tmp:
        root = Path(tmp)
        os.environ.setdefault("FLWR_HOME", str(root / "flwr-home"))  # the simulations' Flower home, not the user's
        cases = [c for c in stage(root) if not only or any(o in c.id for o in only)]
        with consortium(root, cases) as c:
            for case in cases:
                t0 = time.monotonic()
                try:
                    problems = compare(case, c.run(case), simulated(case, root / "sim" / case.id.replace("/", "-")))
                except Exception as err:  # noqa: BLE001 - a failed study is a failed comparison, recorded
                    problems = [f"{type(err).__name__}: {err}"]
                passing += not problems
                line = f"{case.id:36s} {'twin ' if case.twin else ''}{'agree' if not problems else 'DIFFER: ' + '; '.join(problems)} ({time.monotonic() - t0:.0f} s)"
                lines.append(line)
                print(line, flush=True)
    elapsed = time.monotonic() - started
    print(f"{passing}/{len(cases)} bundled studies agree deployed vs simulated ({elapsed:.0f} s)")
    if only:
        return
    from bench.results import record

    record({"deployed_studies_passing": passing, "deployed_studies_total": len(cases), "deployed_studies_seconds": round(elapsed, 1)})


if __name__ == "__main__":
    main(sys.argv[1:])
