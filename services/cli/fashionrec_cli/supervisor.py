"""Process supervision for `fashionrec up`: start, keep alive, and stop cleanly.

Every supervised process (the services, children started here, and the embedded Redis and
Postgres) is restarted when it dies, after an exponential backoff, until it crash-loops (see
restarts.py); then `check()` raises CrashLoop, naming it with its log tail, and `up` stops
everything. Each service runs in its own session (process group), so a stop, or the clean-up
after a crash, reaches Celery's pool children too: nothing is left behind.

No process-manager library: honcho stops everything when one process exits (what this
replaces); supervisord is a daemon driven by a config file whose backoff only covers start-up
failures; circus runs a zmq/tornado arbiter (Unix only) with crash-loop detection as a plugin.
None can watch the embedded Postgres, which pg_ctl daemonises out of our process tree.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fashionrec_cli.restarts import RestartPolicy

log = logging.getLogger("fashionrec.supervisor")

CLEANUP_TIMEOUT_S = 5.0  # for what is left of a process that died (its pool children)
# A start that fails counts as one more death (same backoff, same crash-loop limit).
START_ERRORS: tuple[type[BaseException], ...] = (OSError, subprocess.SubprocessError, TimeoutError)


class Supervised(Protocol):
    """What the supervisor keeps alive: a child process or an embedded server."""

    name: str

    def start(self) -> object:
        """Start (again); returns once it is up."""
        ...

    def exited(self) -> str | None:
        """None while it runs, else how it ended ("exited with code 1")."""
        ...

    def tail(self, lines: int = 20) -> str: ...

    def terminate(self) -> None:
        """Ask it to stop without waiting (servers the others need may wait for stop())."""
        ...

    def stop(self, timeout: float = 20.0) -> None:
        """Stop it and wait, killing what is left at the deadline; also after it died."""
        ...


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


def tail_of(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
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
class Child:
    """A service started by its command line, in its own session, logging to `log_path`."""

    name: str
    args: list[str]
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    starts: int = 0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The first run starts the log afresh; restarts append, so a crash's last lines stay.
        with open(self.log_path, "ab" if self.starts else "wb") as out:
            if self.starts:
                out.write(f"--- fashionrec up: restarting {self.name} ---\n".encode())
                out.flush()
            self.process = subprocess.Popen(
                self.args,
                env=dict(self.env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        log.info("started %s (pid %s), log: %s", self.name, self.process.pid, self.log_path)

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def exited(self) -> str | None:
        if self.process is None:
            return "is not started"
        code = self.process.poll()
        return None if code is None else describe_exit(code)

    def signal_group(self, sig: int) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def tail(self, lines: int = 20) -> str:
        return tail_of(self.log_path, lines)

    def terminate(self) -> None:
        self.signal_group(signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None:
            return
        deadline = time.monotonic() + timeout
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", self.name)
        # The leader may be gone while its pool children linger: sweep the group.
        pgid = self.process.pid
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_alive(pgid):
            self.signal_group(signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait()


class CrashLoop(RuntimeError):
    """A supervised process died more often than the restart policy allows."""

    def __init__(self, name: str, status: str, policy: RestartPolicy, tail: str) -> None:
        super().__init__(
            f"{name} keeps dying (last: it {status}): restarted {policy.recent_restarts} times "
            f"within {policy.window_s:.0f}s, giving up. Last lines of its log:\n{tail}"
        )
        self.name = name


@dataclass
class _Member:
    process: Supervised
    policy: RestartPolicy
    restart_at: float | None = None  # set while it waits out its backoff


@dataclass
class Supervisor:
    env: Mapping[str, str]
    policy: Callable[[], RestartPolicy] = RestartPolicy
    clock: Callable[[], float] = time.monotonic
    members: list[_Member] = field(default_factory=list)

    @property
    def children(self) -> list[Supervised]:
        return [member.process for member in self.members]

    def run_once(self, name: str, args: list[str], log_path: Path, timeout: float) -> None:
        """Run a one-shot step (e.g. migrations) to the end; raise with its log tail on failure."""
        child = Child(name, args, log_path, self.env)
        child.start()
        assert child.process is not None
        try:
            code = child.process.wait(timeout)
        except subprocess.TimeoutExpired:
            child.signal_group(signal.SIGKILL)
            raise RuntimeError(f"{name} did not finish in {timeout:.0f}s; see {log_path}") from None
        if code != 0:
            raise RuntimeError(f"{name} failed (exit {code}):\n{child.tail()}")

    def start(self, name: str, args: list[str], log_path: Path) -> Child:
        child = Child(name, args, log_path, self.env)
        child.start()
        self.adopt(child)
        return child

    def adopt(self, process: Supervised) -> None:
        """Keep a process that is already running alive from now on (the embedded servers)."""
        self.members.append(_Member(process, self.policy()))

    def check(self) -> None:
        """Restart what died once its backoff has passed; CrashLoop when one keeps dying."""
        now = self.clock()
        for member in self.members:
            if member.restart_at is None:
                status = member.process.exited()
                if status is not None:
                    self._died(member, status, now)
            elif now >= member.restart_at:
                self._restart(member)

    def _died(self, member: _Member, status: str, now: float) -> None:
        process = member.process
        process.terminate()  # what is left of it, e.g. the pool children of a killed leader
        process.stop(CLEANUP_TIMEOUT_S)
        delay = member.policy.restart_delay(now)
        if delay is None:
            raise CrashLoop(process.name, status, member.policy, process.tail())
        log.warning(
            "%s %s; restarting it in %.1fs (restart %d of at most %d within %.0fs)",
            process.name,
            status,
            delay,
            member.policy.recent_restarts,
            member.policy.limit,
            member.policy.window_s,
        )
        member.restart_at = now + delay

    def _restart(self, member: _Member) -> None:
        try:
            member.process.start()
        except START_ERRORS as exc:
            self._died(member, f"failed to start ({exc})", self.clock())
            return
        member.restart_at = None
        log.warning("restarted %s", member.process.name)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every service at once, then wait for each in reverse start order (killing
        what is left at the deadline): the embedded servers, adopted first, stop last."""
        processes = [member.process for member in reversed(self.members)]
        for process in processes:
            process.terminate()
        deadline = time.monotonic() + timeout
        for process in processes:
            process.stop(max(0.1, deadline - time.monotonic()))
        self.members.clear()
