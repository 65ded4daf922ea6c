"""`loraserve serve` in a subprocess: wait for its ready line, call it, stop it with a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


class ServeProcess:
    """Starts `python -m service.cli serve --port 0 --log-json ARGS` and reads its JSON log lines.
    Without `--data-dir` in ARGS it gets a fresh temporary one (`self.data_dir`)."""

    def __init__(self, *args: str, ready_timeout: float = 120) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if "--data-dir" not in args:
            self._tmp = tempfile.TemporaryDirectory(prefix="loraserve-data-")
            args = (*args, "--data-dir", self._tmp.name)
        self.data_dir = Path(args[list(args).index("--data-dir") + 1])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", "0", "--log-json", *args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.address = ""
        self.http_port = 0  # with --http-port: the port the HTTP front bound
        # Drain stderr continuously: a full pipe would block the server's logging.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(ready_timeout):
            self.kill()
            raise RuntimeError("the server did not report ready:\n" + "\n".join(self.lines[-30:]))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            event = self.event_of(line)
            if event and event.get("event") == "server_ready":
                self.address = event["address"]
                self.http_port = event.get("http_port") or 0
                self._ready.set()
        self._ready.set()  # the process ended: stop waiting

    @staticmethod
    def event_of(line: str) -> dict | None:
        try:
            value = json.loads(line)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def events(self) -> list[dict]:
        return [e for e in map(self.event_of, list(self.lines)) if e]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._reader.join(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
