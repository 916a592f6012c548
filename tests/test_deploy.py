"""Static checks of deploy/: artefacts agree with what the code sets."""

from __future__ import annotations

import configparser
import fnmatch
import json
import shlex
import subprocess
from pathlib import Path

import click
import pytest
import typer
import yaml

from fedhelix.cli import app
from server.provision import DEFAULT_ADMIN_PORT, DEFAULT_LINK_PORT, load_consortium
from shared.flower_env import FLOWER_ENV


def test_flower_env_file_sets_what_the_code_sets(root: Path) -> None:
    lines = [line for line in (root / "deploy" / "flower.env").read_text().splitlines() if line and not line.startswith("#")]
    declared = dict(line.split("=", 1) for line in lines)
    assert declared  # the file is not empty
    for key, value in declared.items():
        assert FLOWER_ENV.get(key) == value, key
    for key in ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK"):
        assert key in declared



# --------------------------------------------------------------------------- artefacts
# No Docker engine, cluster or systemd here: the artefacts are parsed and checked against
# the CLI (typer app), the consortium files and shared/flower_env.py. tests/e2e runs the
# same `fedhelix server` / `fedhelix node` processes directly.


DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
GATEWAY_PORT = load_consortium(DEPLOY.parent / "studies" / "consortium-demo" / "consortium.toml").port
LINK_PORT = DEFAULT_LINK_PORT
ADMIN_PORT = DEFAULT_ADMIN_PORT


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (DEPLOY / "docker" / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line[:-1].strip()}" if line.endswith("\\") else f"{pending} {line}"
        if not line.endswith("\\"):
            instruction, _, args = pending.strip().partition(" ")
            out.append((instruction.upper(), args.strip()))
            pending = ""
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"exec form expected: {args}"
    return value


def env_of(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in instructions:
        if instruction == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(args)))
    return env


def check_fedhelix_argv(argv: list[str]) -> str:
    """Parse a `fedhelix ...` command line with the real CLI, without running it; return the subcommand."""
    assert argv[0].endswith("fedhelix"), argv
    group = typer.main.get_command(app)
    name, args = argv[1], argv[2:]
    command = group.get_command(click.Context(group), name)
    assert command is not None, f"`fedhelix {name}` is not a command"
    try:
        command.make_context(name, list(args))  # unknown options, missing required ones -> UsageError
    except click.UsageError as err:
        pytest.fail(f"`{shlex.join(argv)}`: {err.format_message()}")
    return name


def flower_env_file() -> dict[str, str]:
    lines = [line for line in (DEPLOY / "flower.env").read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def check_flower_env(env: dict[str, str], where: str) -> None:
    for key, value in flower_env_file().items():
        assert env.get(key) == value, f"{where}: {key}"
    for key, value in env.items():
        if key.startswith(("FLWR_", "RAY_")) and key in FLOWER_ENV:
            assert value == FLOWER_ENV[key], f"{where}: {key}"


@pytest.mark.parametrize(("name", "subcommand"), [("Dockerfile.server", "server"), ("Dockerfile.node", "node")])
def test_dockerfile_runs_the_cli_as_a_non_root_user(name: str, subcommand: str) -> None:
    steps = dockerfile(name)
    kinds = [i for i, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = [args for i, args in steps if i == "RUN"]
    torch_at = next(n for n, args in enumerate(runs) if "torch==2.13.0" in args and "download.pytorch.org/whl/cpu" in args)
    project_at = next(n for n, args in enumerate(runs) if "pip install -e ." in args or "pip install ." in args)
    assert torch_at < project_at  # the CPU wheel first, or pip pulls the CUDA build
    user = [args for i, args in steps if i == "USER"]
    assert len(user) == 1 and kinds.index("USER") > kinds.index("RUN")
    uid = user[0].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric: Kubernetes runAsNonRoot can verify it
    check_flower_env(env_of(steps), name)
    argv = exec_form(dict(steps)["ENTRYPOINT"]) + exec_form(dict(steps)["CMD"])
    assert check_fedhelix_argv(argv) == subcommand
    assert "HEALTHCHECK" in kinds
    for instruction, args in steps:  # no kit, key or site state is copied in
        if instruction in ("COPY", "ADD"):
            assert "kits" not in args and ".key" not in args and "approvals" not in args, args


def test_only_the_server_image_exposes_ports_the_gateway_and_the_admin_listener() -> None:
    server = [args for i, args in dockerfile("Dockerfile.server") if i == "EXPOSE"]
    assert [int(p.split("/")[0]) for a in server for p in a.split()] == [GATEWAY_PORT, ADMIN_PORT]
    assert not [args for i, args in dockerfile("Dockerfile.node") if i == "EXPOSE"]
    for name in ("Dockerfile.server", "Dockerfile.node"):
        assert not [args for _, args in dockerfile(name) if str(LINK_PORT) in args]  # comments aside


def dockerignore() -> list[str]:
    lines = (DEPLOY.parent / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        if fnmatch.fnmatch(path, pattern) or any(fnmatch.fnmatch("/".join(parts[: n + 1]), pattern) for n in range(len(parts))):
            return True
        if pattern.startswith("**/") and any(fnmatch.fnmatch(part, bare) for part in parts):
            return True
    return False


def test_images_hold_every_tracked_python_file_and_no_keys() -> None:
    """The code digest a site approves covers every .py file: an image must hold the same ones."""
    patterns = dockerignore()
    tracked = subprocess.run(["git", "ls-files"], cwd=DEPLOY.parent, capture_output=True, text=True, check=True).stdout.split()
    assert [p for p in tracked if p.endswith(".py") and ignored(p, patterns)] == []
    for secret in ("kits/northeast/node.key", "kits/server/server.key", "kits/ca/ca.key", "site/ledgers/a.ledger.sqlite", "site/a.approvals.json"):
        assert ignored(secret, patterns), secret


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_publishes_the_gateway_and_the_admin_listener_and_runs_real_commands() -> None:
    services = compose()["services"]
    assert {"server", "northeast", "south"} <= set(services)
    published = {name: s.get("ports", []) for name, s in services.items()}
    assert published.pop("server") == [f"{GATEWAY_PORT}:{GATEWAY_PORT}", f"{ADMIN_PORT}:{ADMIN_PORT}"]
    assert all(not ports for ports in published.values()), published  # nodes and the admin dial out
    assert str(LINK_PORT) not in json.dumps([s.get("ports", []) + s.get("expose", []) for s in services.values()])
    assert "network_mode" not in services["admin"] and services["admin"]["networks"] == ["fleet"]  # dials server:9095
    assert load_consortium(DEPLOY / "compose" / "consortium.toml").admin_endpoint == f"server:{ADMIN_PORT}"
    for name, service in services.items():
        argv = (service.get("entrypoint") or ["fedhelix"]) + service["command"]
        assert check_fedhelix_argv(argv) == {"server": "server", "admin": "run"}.get(name, "node")
        assert service["env_file"] == ["./flower.env"] and (DEPLOY / "flower.env").is_file()
    for name in ("server", "northeast", "south"):
        build = services[name]["build"]
        dockerfile_path = DEPLOY / build["context"] / build["dockerfile"]
        assert dockerfile_path.is_file()
        assert exec_form(dict(dockerfile(dockerfile_path.name))["CMD"]) == services[name]["command"]


def mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """container path -> (source, read-only)."""
    out = {}
    for volume in service["volumes"]:
        source, target, *mode = volume.split(":")
        out[target] = (source, mode == ["ro"])
    return out


@pytest.mark.parametrize("site", ["northeast", "south"])
def test_compose_node_mounts_kit_site_and_data_read_only_and_state_writable(site: str) -> None:
    doc = compose()
    service = doc["services"][site]
    m = mounts(service)
    command = service["command"]
    kit, site_file = command[command.index("--kit") + 1], command[command.index("--site") + 1]
    assert m[kit] == (f"../kits/{site}", True)
    assert m[site_file][1] and (DEPLOY / m[site_file][0]).is_file()
    state_dir = str(Path(site_file).parent)  # approvals and ledgers/ live beside the site file
    assert state_dir in m and not m[state_dir][1] and m[state_dir][0] in doc["volumes"]
    from shared.config import load_site

    config = load_site(DEPLOY / m[site_file][0])
    assert config.name == site
    data_source, data_read_only = m[str(config.data.path)]
    assert data_read_only and (DEPLOY / data_source).is_file()
    assert config.privacy is not None and config.privacy.ledger.parent.name == "ledgers"  # where the node keeps it


def test_compose_server_kit_is_read_only_and_consortium_dials_the_service() -> None:
    services = compose()["services"]
    m = mounts(services["server"])
    assert m["/kits/server"] == ("../kits/server", True)
    assert not m["/kits/server/state"][1]  # server.toml: database = "state/superlink.db"
    assert mounts(services["admin"])["/kits/admin"][1]
    consortium = load_consortium(DEPLOY / "compose" / "consortium.toml")
    assert consortium.host == "server" and consortium.port == GATEWAY_PORT
    assert consortium.link_port == LINK_PORT
    from shared.config import load_study

    study = load_study(DEPLOY / "compose" / "study.toml")
    assert sorted(s.name for s in study.sites) == sorted(consortium.sites) == ["northeast", "south"]


def k8s() -> dict[str, dict]:
    docs = [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return {doc["kind"]: doc for doc in docs}


def test_k8s_server_runs_non_root_and_exposes_only_the_gateway_and_the_admin_listener() -> None:
    docs = k8s()
    assert {"Namespace", "PersistentVolumeClaim", "Deployment", "Service", "NetworkPolicy"} <= set(docs)
    kustomized = set(docs["Kustomization"]["resources"])
    assert kustomized == {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (server,) = pod["containers"]
    assert check_fedhelix_argv(server["command"] + server["args"]) == "server"
    for container in pod["containers"] + pod["initContainers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert [p["containerPort"] for p in server["ports"]] == [GATEWAY_PORT, ADMIN_PORT]
    service_ports = docs["Service"]["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in service_ports] == [(GATEWAY_PORT, server["ports"][0]["name"]), (ADMIN_PORT, server["ports"][1]["name"])]
    ingress = docs["NetworkPolicy"]["spec"]["ingress"]
    assert [p["port"] for rule in ingress for p in rule["ports"]] == [GATEWAY_PORT, ADMIN_PORT]
    assert "/secret/kit/admin.crt" in " ".join(pod["initContainers"][0]["command"])  # the admin listener's one certificate
    assert "admin.key" not in json.dumps(docs)  # never the admin's key on the server
    assert docs["NetworkPolicy"]["spec"]["egress"] == []
    everything = json.dumps(docs)
    assert f": {LINK_PORT}" not in everything and f'"{LINK_PORT}"' not in everything
    check_flower_env({e["name"]: e["value"] for e in server["env"]}, "deployment.yaml")


def test_k8s_kit_comes_from_a_secret_read_only_and_state_from_the_claim() -> None:
    docs = k8s()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (server,) = pod["containers"]
    kit_dir = server["args"][server["args"].index("--kit") + 1]
    by_path = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert by_path[kit_dir].get("readOnly") is True
    assert volumes[by_path[f"{kit_dir}/state"]["name"]]["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    secret_mounts = [m for c in pod["initContainers"] for m in c["volumeMounts"] if "secret" in volumes[m["name"]]]
    assert secret_mounts and all(m["readOnly"] for m in secret_mounts)
    assert "chmod 600 /kits/server/server.key" in " ".join(pod["initContainers"][0]["command"])  # fedhelix refuses a group-readable key
    assert "secretName: " + volumes["kit-secret"]["secret"]["secretName"] in (DEPLOY / "k8s" / "deployment.yaml").read_text()
    assert not any(doc["kind"] == "Secret" for doc in docs.values())  # never a key in a manifest


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    return parser


@pytest.mark.parametrize(("name", "subcommand"), [("fedhelix-node@.service", "node"), ("fedhelix-server.service", "server")])
def test_systemd_units_run_the_cli_hardened_and_do_not_restart_on_config_errors(name: str, subcommand: str) -> None:
    service = unit(name)["Service"]
    argv = shlex.split(service["ExecStart"].replace("%i", "northeast"))
    assert argv[0] == "/opt/fedhelix/.venv/bin/fedhelix"
    assert check_fedhelix_argv(argv) == subcommand
    assert service["User"] == "fedhelix"
    assert service["EnvironmentFile"] == "/etc/fedhelix/flower.env"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict" and service["PrivateTmp"] == "yes"
    assert service["Restart"] == "on-failure"
    writable = service["ReadWritePaths"].split()
    if subcommand == "node":
        site = Path(argv[argv.index("--site") + 1])
        assert str(site.parent) in writable  # approvals and ledgers/ are written beside the site file
        assert "%i" in service["ExecStart"]
    else:
        kit = argv[argv.index("--kit") + 1]
        assert writable == [f"{kit}/state"]  # server.toml: database = "state/superlink.db"
    assert service["RestartPreventExitStatus"] == "2"


def test_the_exit_status_units_do_not_restart_on_is_the_cli_config_error_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from fedhelix.cli import main

    status = int(unit("fedhelix-node@.service")["Service"]["RestartPreventExitStatus"])
    for argv in (["node", "--kit", str(tmp_path / "missing-kit"), "--site", str(tmp_path / "site.toml")], ["server", "--kit", str(tmp_path)]):
        monkeypatch.setattr(sys, "argv", ["fedhelix", *argv])
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code == status, argv
