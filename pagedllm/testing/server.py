"""Run ``pagedllm serve`` in a subprocess for end-to-end tests (uvicorn on a free loopback port).

``with ServerProcess(model_dir, ["--device", "cpu"]) as server:`` starts the server, waits until
``/health`` answers, and stops it (SIGTERM) on exit; ``server.client()`` is an official ``openai`` client
for it. The server's log is kept in a file, shown when it fails to start. :func:`shared_server` lets
several test modules use one server (start-up costs seconds: mostly importing torch and transformers).
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus exposition text as ``{"name{labels}": value}`` plus ``{"name": value}`` for each sample
    (the label-free key keeps the last sample of that name)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^([^\s{]+)(\{[^}]*\})?\s+(\S+)", line)
        if match:
            name, labels, value = match.groups()
            values[name + (labels or "")] = float(value)
            values[name] = float(value)
    return values


class ServerProcess:
    """``pagedllm serve MODEL ARGS`` on a free port of 127.0.0.1, as a context manager.

    ``api_key`` is passed as ``--api-key`` and used by :meth:`client`. Raises RuntimeError with the
    server's log if it exits or is not healthy within ``startup_timeout_s``.
    """

    def __init__(self, model: str | Path, args: Sequence[str] = (), api_key: str | None = None,
                 startup_timeout_s: float = 120.0, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.host = "127.0.0.1"
        self.url = f"http://{self.host}:{self.port}"
        self.api_key = api_key
        command = [sys.executable, "-m", "pagedllm", "serve", str(model), "--host", self.host,
                   "--port", str(self.port), *args]
        if api_key is not None:
            command += ["--api-key", api_key]
        self.command = command
        self._log = tempfile.NamedTemporaryFile(prefix="pagedllm-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.log_path = Path(self._log.name)
        self.startup_timeout_s = startup_timeout_s
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server and delete its log."""
        self.stop()
        self.log_path.unlink(missing_ok=True)

    @property
    def is_running(self) -> bool:
        """True between a successful :meth:`start` and the process's exit."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the process and wait until ``/health`` answers 200."""
        import httpx

        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self._env)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server was not healthy after {self.startup_timeout_s} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        """Send ``sig`` and wait for the exit (killing after ``timeout_s``); returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        """Everything the server printed so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs: Any) -> Any:
        """An ``openai.OpenAI`` client for this server (no retries: a failure must show)."""
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "unused", max_retries=0, **kwargs)

    def async_client(self, **kwargs: Any) -> Any:
        """An ``openai.AsyncOpenAI`` client for this server (no retries)."""
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "unused", max_retries=0,
                                  **kwargs)

    def metrics(self) -> dict[str, float]:
        """``GET /metrics``, parsed by :func:`parse_metrics`."""
        import httpx

        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10.0).text)



_SHARED: dict[tuple[str, tuple[str, ...], str | None], ServerProcess] = {}


def shared_server(model: str | Path, args: Sequence[str] = (), api_key: str | None = None,
                  add_cleanup: Callable[[Callable[[], None]], object] | None = None) -> ServerProcess:
    """The running server for ``(model, args, api_key)``, started on first use and then reused.

    ``add_cleanup`` registers its stop (pass ``pytest.Config.add_cleanup`` to stop it at the end of the
    test session); by default it stops when the interpreter exits.
    """
    key = (str(model), tuple(args), api_key)
    server = _SHARED.get(key)
    if server is None or not server.is_running:
        server = ServerProcess(model, args, api_key=api_key)
        server.start()
        _SHARED[key] = server
        (add_cleanup or atexit.register)(server.close)
    return server
