"""The supervisor of `fashionrec up` with real child processes and a fake clock for the backoff."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from fashionrec_cli.restarts import RestartPolicy, backoff
from fashionrec_cli.supervisor import Child, CrashLoop, Supervisor

# A service whose pool child shares its process group (as Celery's prefork children do).
WITH_POOL_CHILD = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "print('serving', flush=True)\n"
    "time.sleep(120)\n"
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def supervisor(clock: FakeClock, limit: int = 3) -> Supervisor:
    return Supervisor(
        dict(os.environ),
        policy=lambda: RestartPolicy(limit=limit, window_s=60, wait=backoff(1, 30)),
        clock=clock,
    )


def pool_child(child: Child) -> psutil.Process:
    assert child.process is not None
    parent = psutil.Process(child.process.pid)
    wait_for(lambda: len(parent.children()) == 1)
    return parent.children()[0]


def test_a_killed_child_is_restarted_after_its_backoff_and_its_group_is_cleaned_up(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    sup = supervisor(clock)
    log_path = tmp_path / "svc.log"
    child = sup.start("svc", [sys.executable, "-c", WITH_POOL_CHILD], log_path)
    try:
        assert child.process is not None
        first_pid = child.process.pid
        orphan = pool_child(child)
        os.kill(first_pid, signal.SIGKILL)  # the leader only, as in the issue
        wait_for(lambda: child.exited() is not None)
        assert child.exited() == "was killed by SIGKILL"

        sup.check()  # noticed: the rest of its group is killed, the restart waits 1 s
        assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
        assert child.process.pid == first_pid
        clock.now += 0.9
        sup.check()
        assert child.process.pid == first_pid  # still backing off
        clock.now += 0.2
        sup.check()
        assert child.process.pid != first_pid and child.exited() is None
        wait_for(lambda: log_path.read_text().count("serving") == 2)
        assert "restarting svc" in log_path.read_text()  # the first run's lines are kept
    finally:
        sup.stop(timeout=10)
    assert child.exited() is not None


def test_a_child_that_keeps_dying_ends_in_a_crash_loop_with_its_log_tail(tmp_path: Path) -> None:
    clock = FakeClock()
    sup = supervisor(clock, limit=2)
    crashing = [sys.executable, "-c", "import sys; print('cannot open weights'); sys.exit(3)"]
    child = sup.start("embedder-0", crashing, tmp_path / "embedder-0.log")
    steady = sup.start("gateway", [sys.executable, "-c", WITH_POOL_CHILD], tmp_path / "gw.log")
    try:
        for _restart in range(2):
            wait_for(lambda: child.exited() is not None)
            sup.check()
            clock.now += 5  # past the backoff (1 s, then 2 s), well within the window
            sup.check()  # restarted
        wait_for(lambda: child.exited() is not None)
        with pytest.raises(CrashLoop) as raised:
            sup.check()
        message = str(raised.value)
        assert raised.value.name == "embedder-0"
        assert "embedder-0 keeps dying (last: it exited with code 3)" in message
        assert "restarted 2 times within 60s" in message
        assert "cannot open weights" in message
        assert child.starts == 3 and steady.starts == 1
    finally:
        sup.stop(timeout=10)
    assert steady.exited() is not None


def test_a_start_that_fails_counts_as_a_death(tmp_path: Path) -> None:
    clock = FakeClock()
    sup = supervisor(clock, limit=1)
    child = sup.start("svc", [sys.executable, "-c", "pass"], tmp_path / "svc.log")
    wait_for(lambda: child.exited() is not None)
    child.args = [str(tmp_path / "no-such-program")]
    sup.check()  # restart 1 of 1, in 1 s
    clock.now += 5
    with pytest.raises(CrashLoop, match=r"svc keeps dying .*failed to start .*No such file"):
        sup.check()  # the restart raises OSError: one more death, over the limit
    sup.stop()


def test_stop_ends_every_group(tmp_path: Path) -> None:
    sup = Supervisor(dict(os.environ))
    children = [
        sup.start(f"svc-{n}", [sys.executable, "-c", WITH_POOL_CHILD], tmp_path / f"{n}.log")
        for n in range(2)
    ]
    pool = [pool_child(child) for child in children]
    sup.stop(timeout=10)
    assert all(child.exited() is not None for child in children)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in pool)
    assert sup.members == []
