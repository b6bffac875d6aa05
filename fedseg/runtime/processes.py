"""Supervised Flower processes: SuperLink, SuperNodes and the ``flwr`` CLI.

Why subprocesses: Flower 1.42 has no stable Python API that embeds a SuperLink or SuperNode
(see shared docs), and its runtime spawns ``flower-superexec`` by bare name, so we start the real
executables from this interpreter's ``bin/`` with that folder first on PATH. Every child runs in
its own session (process group) so that stopping it also stops the superexec/ClientApp
processes it spawned — killing only the parent leaves them behind. Telemetry and the update
check are switched off in every process we start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fedseg.errors import FedsegError

BIN_DIR = Path(sys.executable).parent


def flower_env(flwr_home: Path | None = None, extra: Mapping[str, str] | None = None) -> dict:
    env = dict(os.environ)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    if extra:
        env.update(extra)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: ManagedProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FedsegError(
                f"{proc.name} exited (code {proc.poll()}) before listening on {host}:{port}; "
                f"see {proc.log_path}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise FedsegError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def parent_death_preexec(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to send ``sig`` to the child when its parent dies.

    Why: the children of ``fedseg-server`` (SuperLink, and through it SuperExec and ServerApp,
    which exit when their own parent goes: Flower's ``--parent-pid`` monitors) run in their
    own sessions so that they can be stopped as groups; a SIGKILL of the supervisor used to
    leave them running and listening on the SuperLink's port. ``prctl(PR_SET_PDEATHSIG)``
    survives ``exec``; the check of ``getppid`` covers a parent that died before the call.
    None where there is no prctl (not Linux): the pid-file clean-up of ``fedseg-server
    resume/stop`` is the fallback there. The libc function is looked up here, in the parent,
    so the child runs no import between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent is already gone: do what the signal would
            os.kill(os.getpid(), int(sig))

    return preexec


class ManagedProcess:
    """A child process in its own process group, logging to a file, always stoppable."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str],
        cwd: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env)
        self.cwd = cwd
        # SIGTERM to the child when THIS process dies, even by SIGKILL (Linux; see
        # parent_death_preexec): a supervisor that is killed leaves nothing listening. Only for
        # children started from the main thread (the signal follows the forking THREAD's exit).
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        exe = self.argv[0]
        if not Path(exe).is_absolute() and (BIN_DIR / exe).exists():
            exe = str(BIN_DIR / exe)
        try:
            self.proc = subprocess.Popen(
                [exe, *self.argv[1:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=parent_death_preexec() if self.die_with_parent else None,
            )
        except FileNotFoundError:
            raise FedsegError(
                f"{self.argv[0]}: executable not found; install fedseg's dependencies "
                "(pip install -e .) in this environment"
            ) from None
        finally:
            log.close()
        return self

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the whole group, then SIGKILL what is left after ``timeout``."""
        stop_all([self], timeout)

    def kill(self) -> None:
        """SIGKILL the group at once (used by fault tests and on a second Ctrl-C)."""
        detached = descendants(self.pid) if self.pid else set()
        self.signal_group(signal.SIGKILL)
        _signal_pids(detached, signal.SIGKILL)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _parent_map() -> dict[int, int]:
    """pid -> parent pid of every process we can see (Linux /proc; empty elsewhere)."""
    out: dict[int, int] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ..." — comm may hold spaces and parentheses
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1:
            out[int(d.name)] = int(fields[1])
    return out


def descendants(pid: int | None) -> set[int]:
    """All live descendants of ``pid``. Needed because Flower starts its ``flower-superexec``
    in a NEW session (``start_new_session``), out of reach of a signal to our child's group."""
    if not pid:
        return set()
    parents = _parent_map()
    children: dict[int, list[int]] = {}
    for c, par in parents.items():
        children.setdefault(par, []).append(c)
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _signal_pids(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0); treat it as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def stop_all(procs: Sequence[ManagedProcess], timeout: float = 10.0) -> None:
    """Stop several supervised processes at once (in parallel, not one timeout after another):
    SIGTERM every group and every detached descendant, wait up to ``timeout`` for all of them,
    then SIGKILL whatever is left."""
    procs = [p for p in procs if p.proc is not None]
    detached: set[int] = set()
    for p in procs:
        detached |= descendants(p.pid)
    for p in procs:
        p.signal_group(signal.SIGTERM)
    _signal_pids(detached, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            p.poll()  # reap
        if all(p.poll() is not None for p in procs) and not any(pid_alive(d) for d in detached):
            break
        time.sleep(0.1)
    for p in procs:
        p.signal_group(signal.SIGKILL)  # also catches group members whose leader has exited
    _signal_pids({d for d in detached if pid_alive(d)}, signal.SIGKILL)
    for p in procs:
        try:
            p.proc.wait(timeout=5)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            pass


def superlink_argv(
    port: int,
    host: str = "127.0.0.1",
    database: str = ":flwr-in-memory:",
    insecure: bool = True,
    ssl: tuple[Path, Path, Path] | None = None,
    enable_auth: bool = False,
) -> list[str]:
    argv = [
        "flower-superlink",
        "--host", host,
        "--port", str(port),
        "--database", database,
        "--disable-runtime-dependency-installation",
    ]
    if insecure:
        argv.append("--insecure")
    elif ssl is not None:
        cert, key, ca = ssl
        argv += ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                 "--ssl-ca-certfile", str(ca)]
    if enable_auth:
        argv.append("--enable-supernode-auth")
    return argv


def node_config_arg(values: Mapping[str, str | int | float]) -> str:
    """Flower's ``--node-config`` string: space-separated TOML key=value pairs."""
    parts = []
    for k, v in values.items():
        parts.append(f"{k}={json.dumps(v)}")
    return " ".join(parts)


def supernode_argv(
    superlink: str,
    port: int,
    node_config: Mapping[str, str | int | float],
    insecure: bool = True,
    root_certificates: Path | None = None,
    auth_private_key: Path | None = None,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
    trusted_entities: Path | None = None,
) -> list[str]:
    """``flower-supernode`` argv. ``trusted_entities``: YAML of the Ed25519 app-signing keys
    whose signed app bundles this node runs (any other bundle is refused)."""
    argv = [
        "flower-supernode",
        "--superlink", superlink,
        "--port", str(port),
        "--node-config", node_config_arg(node_config),
    ]
    if insecure:
        argv.append("--insecure")
    elif root_certificates is not None:
        argv += ["--root-certificates", str(root_certificates)]
    if auth_private_key is not None:
        argv += ["--auth-supernode-private-key", str(auth_private_key)]
    if trusted_entities is not None:
        argv += ["--trusted-entities", str(trusted_entities)]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    return argv


def write_flwr_connection(
    flwr_home: Path, name: str, address: str, insecure: bool = True,
    root_certificates: Path | None = None,
) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection (the default)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]",
             f'address = "{address}"']
    if insecure:
        lines.append("insecure = true")
    elif root_certificates is not None:
        lines.append(f'root-certificates = "{root_certificates}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def flwr_cli(args: Sequence[str], env: Mapping[str, str], timeout: float = 60.0) -> dict:
    """Run ``flwr ARGS --format json`` and return the parsed JSON (FedsegError on failure)."""
    cmd = [str(BIN_DIR / "flwr"), *args, "--format", "json"]
    try:
        out = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FedsegError(f"'flwr {' '.join(args)}' did not answer in {timeout:.0f} s") from None
    text = out.stdout.strip()
    start = text.find("{")
    try:
        data = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        data = {}
    if out.returncode != 0 or not data.get("success", False):
        detail = data.get("error-message") or (out.stderr or text).strip().splitlines()[-1:]
        raise FedsegError(f"'flwr {args[0]}' failed: {detail}")
    return data
