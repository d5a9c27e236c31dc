"""A private RabbitMQ node that a test or a soak may kill, restart and throw away.

The shared broker (port 5672) is never stopped or restarted: other work uses it. A test that
must kill a broker starts a node of its own instead, on free ports, with every file (config,
Mnesia data, logs, console output, PID file, Erlang cookie) in one temporary directory owned by
the user the node runs as: ``rabbitmq`` when we are root, as the packaged broker runs,
otherwise ourselves. The directory is also the ``HOME`` of the server and of ``rabbitmqctl``,
so both use its private Erlang cookie, whatever cookie the machine's broker has.

:meth:`RabbitNode.kill` is a SIGKILL of the Erlang VM (read from the PID file); a later
:meth:`RabbitNode.start` boots the same data directory, so durable queues and the persistent
messages in them come back, as after a power cut. Startup failures raise :class:`NodeError`
with the cause and what to do about it: a test must fail loudly, never skip.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

__all__ = ["SBIN", "NodeError", "RabbitNode", "free_port"]

#: where Debian's ``rabbitmq-server`` package installs the real scripts (``/usr/sbin`` holds a
#: wrapper that switches user and hides the output); ``SAGA_RABBITMQ_SBIN`` overrides it
SBIN = Path(os.environ.get("SAGA_RABBITMQ_SBIN", "/usr/lib/rabbitmq/bin"))

#: ports a private node must not take: the shared broker, its distribution port, epmd, and the
#: range ``rabbitmqctl`` itself listens on for distribution (RABBITMQ_CTL_DIST_PORT_MIN..+10)
_RESERVED = {5672, 25672, 4369, *range(35672, 35683)}


class NodeError(RuntimeError):
    """The private node could not be started, stopped or reached; the message says why and
    how to fix it."""


def free_port(avoid: set[int] | None = None) -> int:
    """A TCP port nothing listens on right now on 127.0.0.1 (racy by nature: use it soon)."""
    avoid = _RESERVED | (avoid or set())
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            return port
    raise NodeError("no free TCP port found on 127.0.0.1 after 100 tries")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Erlang binds it
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no {path.name})"
    return "\n".join(text.splitlines()[-lines:]) or f"({path.name} is empty)"


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


class RabbitNode:
    """One RabbitMQ node of our own: ``start``, ``kill``, ``start`` again, ``close``.

    Usable as a context manager (started on enter, killed and deleted on exit).
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        port: int | None = None,
        dist_port: int | None = None,
        startup_timeout: float = 90.0,
        sbin: Path = SBIN,
        extra_config: str = "",
        advanced_config: str = "[].\n",
        cookie: str | None = None,
    ):
        self.name = name or f"saga-{secrets.token_hex(4)}"
        self.host = socket.gethostname().split(".")[0]
        self.port = port or free_port()
        self.dist_port = dist_port or free_port({self.port})
        self.startup_timeout = startup_timeout
        self.sbin = sbin
        self.extra_config = extra_config  # more rabbitmq.conf lines, e.g. a TLS listener
        self.advanced_config = advanced_config  # advanced.config (Erlang terms)
        #: the Erlang cookie; nodes of one cluster must share it (a random one by default)
        self.cookie = cookie or secrets.token_hex(20).upper()
        self.user = "rabbitmq" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self.guest_password = "guest"  # guest may connect from loopback only: fine for tests
        self._base: Path | None = None
        self._server: subprocess.Popen[bytes] | None = None  # the launcher, while the VM runs

    # --- names and addresses -----------------------------------------------------------

    @property
    def node(self) -> str:
        """The Erlang node name, for ``rabbitmqctl -n``."""
        return f"{self.name}@{self.host}"

    @property
    def base(self) -> Path:
        """The node's directory (config, data, logs, PID file, cookie); made on first use."""
        if self._base is None:
            self._base = self._make_base()
        return self._base

    @property
    def url(self) -> str:
        """An amqp:// URL for the default vhost as ``guest``."""
        return self.url_for("guest", self.guest_password)

    def url_for(self, user: str, password: str, vhost: str = "/") -> str:
        """An amqp:// URL of this node for ``user`` on ``vhost``."""
        who = f"{quote(user, safe='')}:{quote(password, safe='')}"
        path = "" if vhost == "/" else quote(vhost, safe="")
        return f"amqp://{who}@127.0.0.1:{self.port}/{path}"

    @property
    def pid_file(self) -> Path:
        return self.base / "rabbit.pid"

    @property
    def console_file(self) -> Path:
        """What the server printed: where errors before its log starts (config) end up."""
        return self.base / "console.log"

    @property
    def log_file(self) -> Path:
        return self.base / "log" / f"{self.node}.log"

    @property
    def pid(self) -> int | None:
        """The Erlang VM's pid while it runs (from the PID file), else None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) and self._ours(pid) else None

    def _ours(self, pid: int) -> bool:
        """Whether ``pid`` is this node's VM, not a process that reused a killed VM's pid."""
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except FileNotFoundError:
            return False
        except PermissionError:  # not ours to read, so not ours to kill
            return False
        return f"RABBITMQ_PID_FILE={self.pid_file}".encode() in environ.split(b"\0")

    def running(self) -> bool:
        return self.pid is not None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Boot the node (again, after a kill: same data) and return once it serves AMQP.

        Raises NodeError with the node's log tail when it does not come up in time.
        """
        if self.running():
            raise NodeError(f"node {self.node} already runs (pid {self.pid})")
        for what, port in (("AMQP", self.port), ("distribution", self.dist_port)):
            if not _port_free(port):
                raise NodeError(
                    f"cannot start {self.node}: its {what} port {port} on 127.0.0.1 is taken "
                    "by another process; pick other ports (RabbitNode(port=..., dist_port=...))"
                )
        # A stale PID file of a killed VM: a failed boot deletes the file at exit anyway.
        self.pid_file.unlink(missing_ok=True)
        server = self.sbin / "rabbitmq-server"
        if not os.access(server, os.X_OK):
            raise NodeError(
                f"{server} not found: install RabbitMQ (Debian: apt-get install rabbitmq-server) "
                "or set SAGA_RABBITMQ_SBIN to the directory holding rabbitmq-server and "
                "rabbitmqctl"
            )
        # In the foreground, not -detached: a detached VM sends its console (where a bad config
        # or a taken port is reported) to /dev/null, and leaves no process to watch for an
        # early exit. Its own session, so a Ctrl-C of the caller does not reach it.
        with self.console_file.open("ab") as console:
            self._server = subprocess.Popen(
                self._as_user([str(server)]),
                env=self._env(),
                cwd=self.base,  # an erl_crash.dump lands here, not in the caller's cwd
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._await_startup()

    def _await_startup(self) -> None:
        """``await_startup`` gives up at once on a node epmd does not know yet: poll for the PID
        file (written once distribution is up), then let ``await_startup`` wait for the boot."""
        deadline = time.monotonic() + self.startup_timeout
        while self.pid is None:
            code = self._server.poll() if self._server is not None else None
            if code is not None:
                raise self._startup_error(f"rabbitmq-server exited with code {code}")
            if time.monotonic() > deadline:
                raise self._startup_error(
                    f"no PID file after {self.startup_timeout:g}s: the VM never got going"
                )
            time.sleep(0.1)
        left = max(int(deadline - time.monotonic()), 5)
        result = self._run(
            self._ctl_argv("await_startup", "--timeout", str(left)), timeout=left + 15, check=False
        )
        if result.returncode != 0:
            raise self._startup_error(f"rabbitmqctl await_startup: {result.stdout.strip()}")
        while not _accepts(self.port):  # await_startup returns as the listeners start
            if time.monotonic() > deadline:
                raise self._startup_error(f"nothing accepts connections on port {self.port}")
            time.sleep(0.05)

    def _startup_error(self, why: str) -> NodeError:
        self._kill_all()  # half-booted: do not leave it behind
        return NodeError(
            f"private RabbitMQ node {self.node} (AMQP port {self.port}, distribution port "
            f"{self.dist_port}, files in {self.base}) did not start: {why}.\n"
            "Check that RabbitMQ is installed, that epmd can run on 127.0.0.1:4369, that the "
            "ports are free and that the machine is not out of memory or disk.\n"
            f"Console:\n{_tail(self.console_file, 15)}\nLog:\n{self.log_tail(15)}"
        )

    def kill(self, within: float = 15.0) -> None:
        """SIGKILL the VM, as a power cut would, and wait until its port is closed."""
        pid = self.pid
        if pid is None:
            raise NodeError(f"node {self.node} is not running: nothing to kill")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self._wait_gone(pid, within)

    def stop(self, within: float = 60.0) -> None:
        """A clean shutdown (``rabbitmqctl stop``); a SIGKILL if that fails."""
        pid = self.pid
        if pid is None:
            return
        result = self._run(self._ctl_argv("stop", str(self.pid_file)), timeout=within, check=False)
        if result.returncode != 0 or _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._wait_gone(pid, within)

    def close(self) -> None:
        """Kill the node if it runs and delete its directory: nothing of it is left."""
        try:
            self._kill_all()
        finally:
            if self._base is not None:
                shutil.rmtree(self._base, ignore_errors=True)
                self._base = None

    def _kill_all(self) -> None:
        """SIGKILL the VM and the launcher's whole session (a boot that hung has no PID file
        yet), and wait for both."""
        pid = self.pid if self._base is not None else None
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._server is not None and self._server.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._server.pid, signal.SIGKILL)
        if pid is not None:
            self._wait_gone(pid, 15)
        self._reap(5)

    def _wait_gone(self, pid: int, within: float) -> None:
        deadline = time.monotonic() + within
        while _alive(pid) or _accepts(self.port):
            if time.monotonic() > deadline:
                raise NodeError(
                    f"node {self.node} (pid {pid}) still runs or listens on {self.port} "
                    f"{within:g}s after it was told to go"
                )
            time.sleep(0.05)
        self._reap(within)

    def _reap(self, within: float) -> None:
        """Collect the exit status of the launcher (``runuser``, the script) once the VM is
        gone, so no zombie is left behind."""
        if self._server is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._server.wait(timeout=within)
                self._server = None

    def __enter__(self) -> RabbitNode:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- rabbitmqctl -------------------------------------------------------------------

    def rabbitmqctl(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        """Run ``rabbitmqctl -n <node> args...``; its output, or NodeError when it fails."""
        result = self._run(self._ctl_argv(*args), timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise NodeError(
                f"rabbitmqctl {' '.join(args)} on {self.node} failed "
                f"(exit {result.returncode}): {result.stdout.strip()}"
            )
        return result.stdout

    def _ctl_argv(self, *args: str) -> list[str]:
        return [str(self.sbin / "rabbitmqctl"), "-q", "-n", self.node, *args]

    def log_tail(self, lines: int = 30) -> str:
        return _tail(self.log_file, lines)

    # --- plumbing ----------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        base = self._base
        assert base is not None
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_", "SAGA_")) and k != "HOME"
        }
        env.update(
            HOME=str(base),  # its .erlang.cookie is shared by the node and rabbitmqctl
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.pid_file),
            # ours, not the machine's rabbitmq-env.conf, which names the shared node
            RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),
        )
        return env

    def _as_user(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", self.user, "--", *argv] if os.geteuid() == 0 else argv

    def _run(
        self,
        argv: list[str],
        *,
        timeout: float,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        argv = self._as_user(argv)
        try:
            result = subprocess.run(
                argv,
                env=self._env(),
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise NodeError(f"{' '.join(argv)} did not finish within {timeout:g}s") from exc
        except OSError as exc:
            raise NodeError(f"cannot run {argv[0]}: {exc}") from exc
        if check and result.returncode != 0:
            raise NodeError(
                f"{' '.join(argv)} failed (exit {result.returncode}): {result.stdout.strip()}\n"
                f"node log:\n{self.log_tail()}"
            )
        return result

    def _make_base(self) -> Path:
        base = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "log.console = false\n"
            "log.file.level = info\n" + self.extra_config
        )
        (base / "advanced.config").write_text(self.advanced_config)
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text(
            # distribution and epmd on loopback only, like the shared node
            "ERL_EPMD_ADDRESS=127.0.0.1\nexport ERL_EPMD_ADDRESS\n"
            'SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"\n'
        )
        cookie = base / ".erlang.cookie"
        cookie.write_text(self.cookie)
        cookie.chmod(0o400)
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam(self.user)
            except KeyError:
                shutil.rmtree(base, ignore_errors=True)
                raise NodeError(
                    f"there is no {self.user!r} user to run the private node as; install "
                    "RabbitMQ from the distribution's package, which creates it"
                ) from None
            for path in [base, *base.iterdir()]:
                os.chown(path, account.pw_uid, account.pw_gid)
        base.chmod(0o700)
        return base
