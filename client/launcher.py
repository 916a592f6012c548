"""A warm ClientApp launcher: heavy imports once, one forked child per task.

Stock Flower starts a fresh ``flwr-clientapp`` process for every message, and
importing torch, flwr, opacus and PyG takes seconds each time. With the
SuperNode in ``--isolation process`` no SuperExec runs on the node; this
launcher takes its place: it imports the heavy libraries once, polls the
node's Runtime API (``AcquireTask``) for ``flwr-clientapp`` tasks and forks a
child per task that runs Flower's own ``run_clientapp`` with the task's token.
Each task still runs in its own process (a crash or leak ends with it).

Hazards handled here, each with a test:

- a forked child inherits the parent's random state, so every task would
  draw the same dropout masks, shuffles and DP-SGD noise: each child reseeds
  Python's, NumPy's and torch's generators from ``secrets`` (the OS CSPRNG);
- a parent that ran a multi-thread OpenMP pool makes forked children hang:
  the parent stays at one thread and never runs a torch op; the child sets
  its own thread count;
- the app's own code (``client``, ``server``, ``shared``, ``fedhelix``) must
  come from the run's FAB, never from the parent: the parent does not preload
  it and the child forgets any of it before loading the ClientApp;
- ``AcquireTask`` is unauthenticated unless the SuperNode and the launcher
  share a secret: use ``--superexec-auth-secret-file`` on the SuperNode and
  ``--secret-file`` here with the same owner-only file (see
  :func:`write_secret_file`).

    python -m client.launcher --runtime-api-address 127.0.0.1:9094 --secret-file node.secret
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import random
import secrets
import signal
import stat
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from shared.errors import ConfigError
from shared.flower_env import apply_flower_env
from shared.flower_polling import FAST, IdleBackoff, shorten_object_pull_backoff

log = logging.getLogger("fedhelix.launcher")

# Third-party modules the ClientApp imports; importing them once is the point of the launcher.
HEAVY_MODULES = (
    "numpy",
    "pandas",
    "scipy.stats",
    "sklearn.metrics",
    "sklearn.model_selection",
    "lifelines.utils",
    "sqlite3",
    "tomllib",
    "torch",
    "opacus",
    "torch_geometric",
    "cryptography.x509",  # approval and SecAgg+ key checks
    "cryptography.hazmat.primitives.ciphers",
    "narwhals._pandas_like.dataframe",  # scikit-learn's lazy dataframe layer (train_test_split on pandas)
    "narwhals._pandas_like.namespace",
    "flwr.app",
    "flwr.client",
    "flwr.client.mod",
    "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp",
)
# The app's own packages: always loaded fresh in the child, from the run's FAB.
APP_PACKAGES = frozenset({"client", "server", "shared", "fedhelix"})
CLIENTAPP_TASK = "flwr-clientapp"
ACQUIRE_TASK_METHOD = "/flwr.proto.Runtime/AcquireTask"
SECRET_BYTES = 32
WAKE_IDLE_CAP_S = 2.0  # idle poll when the SuperNode wakes us for each message: a fallback only


# -- the shared secret with the SuperNode --------------------------------------
def write_secret_file(path: str | Path) -> Path:
    """Create a fresh random secret readable by its owner only (0600); for ``--superexec-auth-secret-file``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secrets.token_bytes(SECRET_BYTES))
    finally:
        os.close(fd)
    return path


def read_secret_file(path: str | Path) -> bytes:
    """The secret's bytes; refuses a missing, empty or group/other-readable file."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
        secret = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"launcher secret file {path} cannot be read ({err.strerror}). Fix: create it with `python -m client.launcher --new-secret {path}`") from err
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"launcher secret file {path} is readable by others (mode {stat.S_IMODE(mode):o}). Fix: chmod 600 {path}")
    if not secret:
        raise ConfigError(f"launcher secret file {path} is empty. Fix: create it with `python -m client.launcher --new-secret {path}`")
    return secret


# -- what the parent holds and what each child does first ------------------------
def preload(modules: Iterable[str] = HEAVY_MODULES) -> list[str]:
    """Import the installed heavy modules once (missing ones are skipped); never the app's own."""
    loaded = []
    for name in modules:
        if name.split(".")[0] in APP_PACKAGES:
            raise ValueError(f"refusing to preload the app's own module '{name}': a new app version would run old code")
        if importlib.util.find_spec(name.split(".")[0]) is None:
            continue
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:  # a submodule a newer version moved: the child imports what it needs
            continue
        loaded.append(name)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)  # a parent with an OpenMP pool makes forked children hang
    return loaded


_TORCH_CPU_STATE_BYTES = 5056  # torch's CPUGeneratorImplState (checked on torch 2.13 by tests/test_randomness.py)


def reseed_from_os() -> None:
    """Give this process fresh random state from the OS CSPRNG (a forked child starts with its parent's).

    ``torch.manual_seed`` keeps only 32 bits on CPU, so torch's Mersenne Twister gets
    all 624 state words from the OS instead (19,968 bits). That state drives dropout
    and plain shuffling only: DP noise and batches come from ``client.privacy.randomness``.
    """
    random.seed(secrets.token_bytes(32))
    if "numpy" in sys.modules:
        np = sys.modules["numpy"]
        np.random.seed(np.frombuffer(secrets.token_bytes(32), dtype=np.uint32))
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch.manual_seed(secrets.randbits(63))  # also resets the cached normal and any other device's generator
        state = torch.get_rng_state()
        if state.numel() == _TORCH_CPU_STATE_BYTES and sys.byteorder == "little":  # layout: seed u64, left i32, seeded i32, next u64, 624 x u64 words
            words = state[24 : 24 + 624 * 8].view(624, 8)
            words[:, :4] = torch.frombuffer(bytearray(secrets.token_bytes(624 * 4)), dtype=torch.uint8).view(624, 4)
            torch.set_rng_state(state)


def forget_app_modules() -> list[str]:
    """Drop the app's own modules from ``sys.modules`` so the ClientApp loads from the run's FAB."""
    names = [name for name in sys.modules if name.split(".")[0] in APP_PACKAGES]
    for name in names:
        del sys.modules[name]
    return names


def fork_task(task: Callable[[], object], *, threads: int = 1) -> int:
    """Run ``task`` in a forked child prepared for it; returns the child's pid.

    The child reseeds its random generators, sets its own thread count, forgets
    the app's modules, writes bytecode of the modules it compiles, and leaves with ``os._exit`` so none of the parent's
    exit handlers (its HTTP client, its signal handlers) run twice.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        reseed_from_os()
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        forget_app_modules()
        # Write the run's bytecode beside its installed sources (even under PYTHONDONTWRITEBYTECODE):
        # without it every task recompiles the whole app, ~0.7 s of CPU per message.
        sys.dont_write_bytecode = False
        task()
        code = 0
    except SystemExit as done:  # Flower's run_clientapp ends with sys.exit
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child must never return into the parent's loop
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# -- the loop ----------------------------------------------------------------------
def _runtime_client(runtime_address: str, secret: bytes | None, insecure: bool, root_certificates: bytes | None):
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_TASK_METHOD}))
    return RuntimeHttpClient.from_server_address(
        server_address=runtime_address,
        insecure=insecure,
        root_certificates=None if insecure else root_certificates,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


def _reap(children: dict[int, float]) -> None:
    for pid, started in list(children.items()):
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            del children[pid]
            code = os.waitstatus_to_exitcode(status)
            took, cpu = time.monotonic() - started, usage.ru_utime + usage.ru_stime
            if code != 0:
                log.warning("ClientApp task process %d exited with %d after %.2f s", pid, code, took)
            else:
                log.info("ClientApp task process %d done in %.2f s (%.2f s CPU)", pid, took, cpu)


def run_launcher(
    runtime_address: str,
    secret_file: str | Path | None,
    *,
    insecure: bool = True,
    root_certificates: str | Path | None = None,
    poll_interval: float = FAST.task_s,
    threads: int = 1,
    preload_modules: Sequence[str] = HEAVY_MODULES,
    pull_backoff: float = FAST.pull_backoff_s,
    max_tasks: int | None = None,
    wake_name: str | None = None,
) -> None:
    """Serve ``flwr-clientapp`` tasks of the SuperNode whose Runtime API is at ``runtime_address``.

    Runs until terminated (or after ``max_tasks`` tasks, for tests). ``secret_file``
    is the file also given to the SuperNode's ``--superexec-auth-secret-file``;
    ``None`` leaves ``AcquireTask`` unauthenticated (anyone on the host could take
    the node's tasks), so it is logged as a warning. ``insecure`` and
    ``root_certificates`` describe the Runtime API's TLS (loopback: insecure).
    ``wake_name``: the SuperNode's ``--wake-name``; it signals each new message there
    (:mod:`client.task_wakeup`), so idle polls can be slow without delaying a task.
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    from client.task_wakeup import WakeListener

    apply_flower_env()
    secret = read_secret_file(secret_file) if secret_file is not None else None
    if secret is None:
        log.warning("launcher without a secret file: the node's AcquireTask is unauthenticated")
    certificates = Path(root_certificates).expanduser().read_bytes() if root_certificates and not insecure else None
    started = time.monotonic()
    wakeup = WakeListener(wake_name)  # before the slow preload: a message arriving meanwhile still wakes us
    loaded = preload(preload_modules)
    shorten_object_pull_backoff(pull_backoff)
    log.info(
        "launcher ready in %.1f s (preloaded %s); polling %s every %g s%s", time.monotonic() - started, ", ".join(loaded) or "nothing",
        runtime_address, poll_interval, " and on each wake-up from the SuperNode" if wakeup.active else "",
    )  # fmt: skip

    client = _runtime_client(runtime_address, secret, insecure, certificates)
    # Without wake-ups: fast while tasks run (the next one follows soon), slower when idle.
    # With them, an idle poll is only a fallback for a lost wake-up.
    idle = IdleBackoff(poll_interval, WAKE_IDLE_CAP_S if wakeup.active else FAST.idle_cap_s)
    children: dict[int, float] = {}  # pid -> start (monotonic)
    launched = 0
    me = os.getpid()

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        while max_tasks is None or launched < max_tasks:
            _reap(children)
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[CLIENTAPP_TASK], agentapp_fab_hashes=[]))
            if res.HasField("task") and res.token:
                token = res.token

                def task(token: str = token) -> None:
                    run_clientapp(runtime_api_address=runtime_address, token=token, insecure=insecure, certificates=certificates, parent_pid=me, runtime_dependency_install=False)

                children[fork_task(task, threads=threads)] = time.monotonic()
                launched += 1
                idle.reset()
                continue  # another task may be waiting already
            if children and not wakeup.active:
                idle.reset()
            if wakeup.wait(idle.next()):
                idle.reset()
        while children:  # max_tasks reached: let the last ones finish
            _reap(children)
            time.sleep(0.01)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        client.close()
        wakeup.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m client.launcher", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--runtime-api-address", default="127.0.0.1:9094", help="the SuperNode's Runtime API (its --port); default 127.0.0.1:9094")
    parser.add_argument("--secret-file", help="the file given to the SuperNode's --superexec-auth-secret-file (owner-only)")
    parser.add_argument("--new-secret", metavar="PATH", help="write a fresh owner-only secret file to PATH and exit")
    parser.add_argument("--root-certificates", help="CA of the Runtime API's TLS certificate (omit on loopback)")
    parser.add_argument("--poll-interval", type=float, default=FAST.task_s, help=f"seconds between AcquireTask polls (default {FAST.task_s}; Flower's SuperExec: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each task process (default 1)")
    parser.add_argument("--wake-name", help="socket name the SuperNode signals new messages on (its --wake-name); Linux only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    if args.new_secret:
        print(write_secret_file(args.new_secret))
        return
    try:
        run_launcher(
            args.runtime_api_address,
            args.secret_file,
            insecure=args.root_certificates is None,
            root_certificates=args.root_certificates,
            poll_interval=args.poll_interval,
            threads=args.threads,
            wake_name=args.wake_name,
        )
    except ConfigError as err:
        print(err.line, file=sys.stderr)
        raise SystemExit(2) from None
    except (SystemExit, KeyboardInterrupt):
        pass


if __name__ == "__main__":
    main()
