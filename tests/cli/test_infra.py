"""The embedded servers of `fashionrec up` come back after a SIGKILL, on the same address and
with their data, when supervised."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

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
