"""Child processes of ``rwft-server``, ``rwft-client`` and ``rwft simulate``, and how they stop.

Children (a SuperLink, a SuperNode) stay in the rwft command's process group: a Ctrl-C
in the terminal reaches all of them at once and each shuts down gracefully, and a crash
of the whole command (``kill -9`` of its group, a reboot) takes them down with it, as a
crash should. A crash of the rwft command alone (``kill -9`` of its pid, the OOM killer)
does too: on Linux each child asks the kernel for SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``), so no SuperNode lives on as an orphan that accepts rounds with no
worker behind it. ``stop`` ends one child by its pid, SIGTERM then SIGKILL; the helpers
Flower starts (SuperExec, ServerApp processes) watch their parent and exit with it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from rwft.core.errors import RwftError

PRIVATE_UMASK = 0o077  # files a federation's processes write: state.db, logs, TensorBoard, models
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def private_dir(path: Path) -> Path:
    """``path`` as a folder only this user can enter (0700), made if missing."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` making the child get SIGTERM when ``parent`` dies (Linux; elsewhere none)."""
    if not sys.platform.startswith("linux"):
        return None

    def arm() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def scripts_first_on_path(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this Python's scripts directory first on PATH: Flower starts its helpers
    (``flwr-clientapp``, ``flwr-serverapp``...) by name, and a virtual environment that is
    not activated is not on PATH."""
    return env | {"PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])}


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """The environment for Flower processes: this Python's scripts first on PATH (Flower
    starts ``flower-superexec``, ``flwr-serverapp``... by name), a private ``FLWR_HOME``,
    and no telemetry or update check (sites are often offline; both would wait on the network)."""
    env = scripts_first_on_path(dict(os.environ))
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.update(extra)
    return env


def run_command(prog: str, body: Callable[[], int], *, interrupted: str = "") -> int:
    """Run a federation command's ``body`` and turn how it ends into an exit code.

    SIGTERM stops it as Ctrl-C does (``interrupt_on_sigterm``); an ``RwftError`` becomes
    one line ``PROG: error: ...`` and exit code 2; Ctrl-C exit code 130, after
    ``PROG: interrupted`` when given.
    """
    interrupt_on_sigterm()
    try:
        return int(body())
    except RwftError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if interrupted:
            print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130


def interrupt_on_sigterm() -> None:
    """Let SIGTERM (``kill PID``, a service manager) shut down as cleanly as Ctrl-C does.

    Python's default SIGTERM ends the process at once, leaving its children running.
    """
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; ``ValueError`` with the expected form otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT (for example 127.0.0.1:9092)")
    return host.strip("[]"), int(port)


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "") else host, port)) == 0


class ChildProcess:
    """A command this process started, its output appended to ``log_file``."""

    def __init__(self, name: str, command: Sequence[str], *, env: dict[str, str], log_file: Path,
                 cwd: Path | None = None, umask: int = -1) -> None:
        self.name = name
        self.log_file = log_file
        log_file.parent.mkdir(parents=True, exist_ok=True)
        # Logs name sites, paths and errors: readable by this user only.
        self._log: IO[bytes] = os.fdopen(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        self._log_start = self._log.tell()  # where this process's output begins in an appended log
        # The parent-death signal is per thread: children are started from the main thread.
        self.process = subprocess.Popen(list(command), env=env, cwd=cwd, stdout=self._log,
                                        stderr=subprocess.STDOUT, umask=umask,
                                        preexec_fn=_die_with_parent(os.getpid()))

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_for_port(self, host: str, port: int, timeout_s: float) -> None:
        """Return once ``host:port`` accepts connections; ``RuntimeError`` naming the log otherwise."""
        deadline = time.monotonic() + timeout_s
        while not port_open(host, port):
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with code {self.process.returncode}; see {self.log_file}:\n"
                                   + self.log_tail())
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not open {host}:{port} within {timeout_s:.0f} s; "
                                   f"see {self.log_file}")
            time.sleep(0.2)

    def own_output(self) -> str:
        """What this process wrote to its log (not what earlier processes appended before it)."""
        try:
            with open(self.log_file, "rb") as handle:
                handle.seek(self._log_start)
                return handle.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the child, SIGKILL it if it is still there after ``timeout_s``."""
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
