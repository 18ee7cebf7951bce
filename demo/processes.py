"""The demo's child processes (`velocity stream`, `velocity serve`): started with their logs in the run folder,
watched, stopped cleanly, or left running and remembered so the next demo can stop them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stores.processes import pid_alive

REPO = Path(__file__).resolve().parent.parent


class Child:
    """One `velocity ...` command as a subprocess (its own session: Ctrl-C in the terminal reaches the demo only,
    which stops its children itself), output to `log`."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = [sys.executable, "-m", "velocity_cli", *args]
        self.log = log
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Child:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, cwd=REPO, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else -1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM (the worker commits and archives what it processed), then SIGKILL after `grace_s`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def remember(path: Path, children: list[Child]) -> None:
    """Write the pids of processes left running (`--keep-running`) so the next demo (or a person) can stop them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"name": c.name, "pid": c.pid, "log": str(c.log), "args": c.args[3:]}
                                for c in children], indent=2) + "\n")


def stop_remembered(path: Path, grace_s: float = 30.0) -> list[str]:
    """Stop the processes a previous `velocity demo --keep-running` left (only those: each pid must still run a
    velocity command). Returns one line per process stopped."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    stopped = []
    for e in entries:
        pid = int(e.get("pid", -1))
        if pid <= 0 or not pid_alive(pid) or not _is_velocity(pid):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + grace_s
        while time.monotonic() < end and pid_alive(pid):
            time.sleep(0.2)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stopped.append(f"{e.get('name', '?')} (pid {pid})")
    path.unlink(missing_ok=True)
    return stopped


def _is_velocity(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(part.endswith((b"velocity_cli", b"velocity")) for part in cmdline)
