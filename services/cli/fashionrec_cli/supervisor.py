"""Child-process supervision for `fashionrec up`: start, watch, and stop process groups cleanly.

Each service runs in its own session (process group), so a stop reaches Celery's pool children
too; nothing is left behind after Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("fashionrec.supervisor")


@dataclass
class Child:
    name: str
    args: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, env: Mapping[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:  # one log per run: its tail explains this run
            self.process = subprocess.Popen(
                self.args,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.info("started %s (pid %s), log: %s", self.name, self.process.pid, self.log_path)

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def signal_group(self, sig: int) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@dataclass
class Supervisor:
    env: Mapping[str, str]
    children: list[Child] = field(default_factory=list)

    def run_once(self, name: str, args: list[str], log_path: Path, timeout: float) -> None:
        """Run a one-shot step (e.g. migrations) to the end; raise with its log tail on failure."""
        child = Child(name, args, log_path)
        child.start(self.env)
        assert child.process is not None
        try:
            code = child.process.wait(timeout)
        except subprocess.TimeoutExpired:
            child.signal_group(signal.SIGKILL)
            raise RuntimeError(f"{name} did not finish in {timeout:.0f}s; see {log_path}") from None
        if code != 0:
            raise RuntimeError(f"{name} failed (exit {code}):\n{child.tail()}")

    def start(self, name: str, args: list[str], log_path: Path) -> Child:
        child = Child(name, args, log_path)
        child.start(self.env)
        self.children.append(child)
        return child

    def failed_child(self) -> Child | None:
        for child in self.children:
            if child.exit_code() is not None:
                return child
        return None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every group (reverse start order), wait, then SIGKILL what is left."""
        for child in reversed(self.children):
            child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in reversed(self.children):
            if child.process is None:
                continue
            remaining = max(0.1, deadline - time.monotonic())
            try:
                child.process.wait(remaining)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", child.name)
            # The leader may be gone while its pool children linger: sweep the group.
            pgid = child.process.pid
            end = time.monotonic() + max(0.1, deadline - time.monotonic())
            while _group_alive(pgid) and time.monotonic() < end:
                time.sleep(0.1)
            if _group_alive(pgid):
                child.signal_group(signal.SIGKILL)
            if child.process.poll() is None:
                child.process.wait()
        self.children.clear()
