"""The embedded servers of `fashionrec up` come back after a SIGKILL, on the same address and
with their data, when supervised."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import psycopg2
import redis
from fashionrec_cli.infra import EmbeddedPostgres, EmbeddedRedis
from fashionrec_cli.restarts import RestartPolicy, backoff
from fashionrec_cli.supervisor import Supervisor


def fast_supervisor() -> Supervisor:
    return Supervisor({}, policy=lambda: RestartPolicy(limit=10, window_s=60, wait=backoff(0.1, 1)))


def supervise_until_running(sup: Supervisor, server: EmbeddedPostgres | EmbeddedRedis) -> None:
    """Drive the supervisor (real clock) until the server is back; a restart that fails (e.g.
    Postgres' old backends still exiting) is retried after its backoff."""
    deadline = time.monotonic() + 60
    while server.exited() is not None or any(m.restart_at is not None for m in sup.members):
        assert time.monotonic() < deadline, f"{server.name} did not come back"
        sup.check()
        time.sleep(0.05)


def test_redis_restarts_on_the_same_port_with_its_data(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    sup = fast_supervisor()
    sup.adopt(server)
    try:
        client = redis.Redis.from_url(url)
        client.config_set("appendfsync", "always")  # the write is on disk before the kill
        client.set("kept", "yes")
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while server.exited() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert server.exited() == "was killed by SIGKILL"
        supervise_until_running(sup, server)
        assert client.get("kept") == b"yes"  # same URL: the old client reconnects
    finally:
        sup.stop()
    assert server.process is None


def test_postgres_restarts_on_the_same_data_directory(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pgdata")
    url = server.start()
    sup = fast_supervisor()
    sup.adopt(server)
    try:
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE kept (v text)")
            cur.execute("INSERT INTO kept VALUES ('yes')")
        conn.close()
        postmaster = server.postmaster()
        assert postmaster is not None
        postmaster.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while server.exited() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "is gone" in (server.exited() or "")
        supervise_until_running(sup, server)
        new_postmaster = server.postmaster()
        assert new_postmaster is not None and new_postmaster.pid != postmaster.pid
        assert server.url("fashionrec") == url
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT v FROM kept")
            assert cur.fetchall() == [("yes",)]
        conn.close()
    finally:
        sup.stop()
    assert server.exited() is not None


def write_postmaster_pid(pgdata: Path, pid: int, socket_dir: Path, port: int = 5999) -> Path:
    """postmaster.pid as postgres writes it (pid, data dir, start, port, socket dir, …) and the
    lock file of its socket; returns the latter."""
    pgdata.mkdir(parents=True, exist_ok=True)
    socket_dir.mkdir(parents=True, exist_ok=True)
    lines = [str(pid), str(pgdata), "1700000000", str(port), str(socket_dir), "127.0.0.1"]
    (pgdata / "postmaster.pid").write_text("\n".join(lines) + "\n")
    socket_lock = socket_dir / f".s.PGSQL.{port}.lock"
    socket_lock.write_text(f"{pid}\n{pgdata}\n")
    return socket_lock


def test_the_lock_files_of_an_unreaped_postmaster_are_removed(tmp_path: Path) -> None:
    """A dead postmaster not reaped yet (a zombie) still answers kill(pid, 0): without this its
    lock files made every restart a no-op until init reaped it."""
    child = subprocess.Popen(["true"])  # exits at once; not waited for: a zombie meanwhile
    try:
        deadline = time.monotonic() + 10
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pgdata = tmp_path / "pgdata"
        socket_lock = write_postmaster_pid(pgdata, child.pid, tmp_path / "sockets")
        EmbeddedPostgres(pgdata)._clear_zombie_locks()
        assert not (pgdata / "postmaster.pid").exists()
        assert not socket_lock.exists()
    finally:
        child.wait()


def test_the_lock_files_of_a_live_postmaster_are_kept(tmp_path: Path) -> None:
    pgdata = tmp_path / "pgdata"
    socket_lock = write_postmaster_pid(pgdata, os.getpid(), tmp_path / "sockets")
    EmbeddedPostgres(pgdata)._clear_zombie_locks()
    assert (pgdata / "postmaster.pid").exists() and socket_lock.exists()
    # A garbled file is postgres' business, not removed here.
    (pgdata / "postmaster.pid").write_text("not a pid\n")
    EmbeddedPostgres(pgdata)._clear_zombie_locks()
    assert (pgdata / "postmaster.pid").exists()
