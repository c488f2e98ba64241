"""The server ``inferstack analyze`` measures: a temporary repository and a subprocess.

The user's repository is only read. :class:`TemporaryRepository` copies the
model's directory into a fresh temporary directory: files are hard-linked
when the file system allows it (a large model costs nothing) and copied
otherwise. Symlinks would not do: the server refuses anything that resolves
outside its repository. Only ``config.pbtxt`` is ever written there, and it
is written as a new file (``os.replace``), so a hard-linked original is never
changed.

:class:`ManagedServer` runs ``python -m inferstack serve`` on free loopback
ports in ``explicit`` model control mode and stops it with SIGTERM, then
SIGKILL if it does not exit. On Linux the server also gets SIGTERM if the
analyzing process dies without stopping it (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from inferstack.repository.config import CONFIG_FILENAME

#: Seconds to wait for the server to answer /v2/health/ready (a busy machine loads slowly).
READY_TIMEOUT = 300.0
#: Seconds between SIGTERM and SIGKILL.
STOP_TIMEOUT = 30.0


class AnalyzeError(Exception):
    """The sweep cannot go on; a clear message, no traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _link_or_copy(src: str, dst: str) -> str:
    src = os.path.realpath(src)  # a symlink becomes a file of its own (os.link may link the symlink itself)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


class TemporaryRepository:
    """``<tmp>/repository/<model>``: the model's files, and a config.pbtxt of our own."""

    def __init__(self, model_dir: Path, model: str) -> None:
        self.source = model_dir
        self.model = model
        self.base = Path(tempfile.mkdtemp(prefix="inferstack-analyze-"))
        self.root = self.base / "repository"
        self.model_dir = self.root / model
        self.log_path = self.base / "server.log"

    def populate(self) -> None:
        """Copy (hard-link) everything but config.pbtxt; files outside the model directory are followed."""

        def ignore(directory: str, names: list[str]) -> list[str]:
            return [CONFIG_FILENAME] if Path(directory) == self.source else []

        self.root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.source, self.model_dir, symlinks=False, ignore=ignore, copy_function=_link_or_copy)

    def write_config(self, text: str) -> None:
        """Replace config.pbtxt with a new file (a hard link to the user's file is never written through)."""
        tmp = self.base / "config.pbtxt.new"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.model_dir / CONFIG_FILENAME)

    def remove_config(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.model_dir / CONFIG_FILENAME).unlink()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


#: Linux: the server's process sets PR_SET_PDEATHSIG (kept across exec) before it becomes the server,
#: so it gets SIGTERM if the analyzer dies without stopping it; it gives up if that already happened.
#: A launcher instead of ``preexec_fn``, which is unsafe while other threads (rich's refresh) run.
_LAUNCHER = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
os.execv(sys.executable, [sys.executable, "-m", "inferstack", *sys.argv[2:]])
"""


class ManagedServer:
    """``python -m inferstack serve`` on free loopback ports, explicit model control; always stop() it."""

    def __init__(self, repository: Path, log_path: Path, *, grpc: bool) -> None:
        self.repository = repository
        self.log_path = log_path
        self.grpc = grpc
        self.process: subprocess.Popen | None = None
        self.http_port = self.grpc_port = 0
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def _spawn(self) -> None:
        self.http_port = free_port()
        self.grpc_port = free_port() if self.grpc else 0
        if sys.platform.startswith("linux"):
            launcher = [sys.executable, "-c", _LAUNCHER, str(os.getpid())]
        else:  # pragma: no cover
            launcher = [sys.executable, "-m", "inferstack"]
        args = [
            *launcher, "serve",
            "--model-repository", str(self.repository),
            "--host", "127.0.0.1",
            "--http-port", str(self.http_port),
            "--model-control-mode", "explicit",
            "--no-allow-metrics",
            "--exit-timeout-secs", "5",
        ]
        args += ["--allow-grpc", "--grpc-port", str(self.grpc_port)] if self.grpc else ["--no-allow-grpc"]
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def start(self, timeout: float = READY_TIMEOUT, attempts: int = 3) -> None:
        """Start and wait until ready; a server that exits at once (a port taken meanwhile) is retried."""
        for attempt in range(attempts):
            self._spawn()
            try:
                self._wait_ready(timeout)
                return
            except _ExitedEarly:
                self._close_log()
                if attempt == attempts - 1:
                    raise AnalyzeError(f"the server exited with code {self.process.returncode} while starting") from None

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise _ExitedEarly()
                try:
                    if client.get(self.url + "/v2/health/ready").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise AnalyzeError(f"the server was not ready after {timeout:g} s")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait, SIGKILL if it hangs; returns the exit code (None if never started)."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        self._close_log()
        return process.returncode

    def _close_log(self) -> None:
        if self._log is not None and not self._log.closed:
            self._log.close()


class _ExitedEarly(Exception):
    pass


__all__ = ["READY_TIMEOUT", "AnalyzeError", "ManagedServer", "TemporaryRepository", "free_port"]
