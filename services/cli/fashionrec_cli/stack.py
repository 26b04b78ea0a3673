"""The whole fashionrec stack on one machine: what `fashionrec up` starts, in which order.

External services are used where configured (DATABASE_URL, REDIS_URL, FASHIONREC_STORAGE_S3_ENDPOINT
or S3_ENDPOINT); otherwise embedded ones live under the data directory and survive restarts.
Gateway, indexer API, indexer worker (with the rebuild timer) and embedder workers run as child
processes started by their console entry points. All of them, and the embedded servers, are
supervised: restarted when they die, until one crash-loops (supervisor.py, restarts.py).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fashionrec_cli.client import GatewayClient, GatewayError
from fashionrec_cli.infra import EmbeddedPostgres, EmbeddedRedis, data_dir_layout, free_port
from fashionrec_cli.settings import UpSettings
from fashionrec_cli.supervisor import Supervisor

log = logging.getLogger("fashionrec.stack")

STACK_ENV_FILE = "stack.env"
# What an operator's own command (`fashionrec-indexer rebuild`, `evaluate --index`) needs to
# reach a running one-machine stack; written by `up`, removed when it stops.
_SHARED_KEYS = (
    "DATABASE_URL",
    "REDIS_URL",
    "FASHIONREC_BROKER_URL",
    "FASHIONREC_INDEXER_INDEX_DIR",
)


def read_stack_env(data_dir: Path) -> dict[str, str]:
    """The environment of the stack `fashionrec up` runs on `data_dir` (empty when none runs)."""
    path = data_dir / STACK_ENV_FILE
    if not path.is_file():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value for key, value in pairs}


@dataclass
class StackOptions:
    data_dir: Path
    port: int = 8000
    host: str = "127.0.0.1"
    weights: str | None = None
    backbone: str | None = None
    embedders: int = 1
    ready_timeout_s: float = 300.0
    supervision: UpSettings = field(default_factory=UpSettings)


@dataclass
class Stack:
    options: StackOptions
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    supervisor: Supervisor | None = None
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    _lock: IO[str] | None = None

    @property
    def gateway_url(self) -> str:
        return f"http://{self.options.host}:{self.options.port}"

    def _acquire_lock(self, data_dir: Path) -> None:
        # Two stacks on one data directory would corrupt each other's embedded Postgres and blobs.
        data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(data_dir / ".fashionrec-up.lock", "w")  # noqa: SIM115 - held while up
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another `fashionrec up` is using {data_dir}") from None

    def child_env(
        self, database_url: str, redis_url: str, paths: dict[str, Path]
    ) -> dict[str, str]:
        env = dict(self.environ)
        env.update(
            PYTHONUNBUFFERED="1",
            DATABASE_URL=database_url,
            REDIS_URL=redis_url,
            FASHIONREC_BROKER_URL=redis_url,
            FASHIONREC_INDEXER_INDEX_DIR=str(paths["index"]),
            FASHIONREC_EMBEDDER_CACHE_DIR=str(paths["models"]),
            FASHIONREC_GATEWAY_PORT=str(self.options.port),
        )
        if not (env.get("FASHIONREC_STORAGE_S3_ENDPOINT") or env.get("S3_ENDPOINT")):
            env["FASHIONREC_STORAGE_BACKEND"] = "local"
            env["FASHIONREC_STORAGE_LOCAL_DIR"] = str(paths["blobs"])
        if self.options.weights:
            env["FASHIONREC_EMBEDDER_WEIGHTS"] = self.options.weights
        if self.options.backbone:
            env["FASHIONREC_EMBEDDER_BACKBONE"] = self.options.backbone
        return env

    def start(self, progress: Callable[[str], None] = lambda _: None) -> float:
        """Start everything and wait for the gateway's /readyz; returns seconds to ready."""
        started = time.monotonic()
        paths = data_dir_layout(self.options.data_dir)
        self._acquire_lock(self.options.data_dir)

        database_url = self.environ.get("DATABASE_URL")
        if not database_url:
            progress("starting embedded Postgres")
            self.postgres = EmbeddedPostgres(paths["postgres"])
            database_url = self.postgres.start()
        redis_url = self.environ.get("REDIS_URL")
        if not redis_url:
            progress("starting Redis")
            self.redis = EmbeddedRedis(paths["redis"])
            redis_url = self.redis.start()

        env = self.child_env(database_url, redis_url, paths)
        self.supervisor = Supervisor(env, policy=self.options.supervision.restart_policy)
        for server in (self.postgres, self.redis):
            if server is not None:
                self.supervisor.adopt(server)
        logs = paths["logs"]
        python = sys.executable
        indexer_port = free_port()
        env["FASHIONREC_GATEWAY_INDEXER_URL"] = f"http://127.0.0.1:{indexer_port}"

        progress("migrating the database")
        self.supervisor.run_once(
            "migrate", [python, "-m", "fashionrec_indexer", "migrate"], logs / "migrate.log", 120
        )
        progress("starting indexer, workers and gateway")
        self.supervisor.start(
            "indexer",
            [python, "-m", "fashionrec_indexer", "serve", "--host", "127.0.0.1",
             "--port", str(indexer_port)],
            logs / "indexer.log",
        )  # fmt: skip
        self.supervisor.start(
            "indexer-worker",
            [python, "-m", "fashionrec_indexer", "worker", "--beat"],
            logs / "indexer-worker.log",
        )
        for n in range(self.options.embedders):
            self.supervisor.start(
                f"embedder-{n}",
                [python, "-m", "fashionrec_embedder", "worker", "--concurrency", "1"],
                logs / f"embedder-{n}.log",
            )
        self.supervisor.start(
            "gateway",
            [python, "-m", "fashionrec_gateway", "serve", "--host", self.options.host,
             "--port", str(self.options.port)],
            logs / "gateway.log",
        )  # fmt: skip
        progress("waiting for /readyz")
        self.wait_ready(self.options.ready_timeout_s)
        self._write_stack_env(env)
        return time.monotonic() - started

    def _write_stack_env(self, env: Mapping[str, str]) -> None:
        shared = {k: env[k] for k in _SHARED_KEYS if k in env}
        shared.update({k: v for k, v in env.items() if k.startswith("FASHIONREC_STORAGE_")})
        shared["FASHIONREC_GATEWAY_URL"] = self.gateway_url
        path = self.options.data_dir / STACK_ENV_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold S3 keys
        with os.fdopen(fd, "w") as out:
            out.writelines(f"{key}={value}\n" for key, value in sorted(shared.items()))

    def wait_ready(self, timeout: float) -> None:
        """Poll /readyz, restarting what dies meanwhile; CrashLoop when one keeps dying."""
        assert self.supervisor is not None
        deadline = time.monotonic() + timeout
        last = ""
        with GatewayClient(self.gateway_url, timeout=5.0) as client:
            while time.monotonic() < deadline:
                self.supervisor.check()
                try:
                    client.ready()
                    return
                except GatewayError as exc:
                    last = str(exc)
                time.sleep(0.25)
        raise TimeoutError(f"the stack was not ready after {timeout:.0f}s; last answer: {last}")

    def watch(self, poll_s: float = 0.5) -> None:
        """Keep everything alive until interrupted; raises CrashLoop when one keeps dying."""
        assert self.supervisor is not None
        while True:
            self.supervisor.check()
            time.sleep(poll_s)

    def stop(self) -> None:
        (self.options.data_dir / STACK_ENV_FILE).unlink(missing_ok=True)
        if self.supervisor is not None:
            self.supervisor.stop()  # the embedded servers too, after the services
        else:  # the start failed before the supervisor took the servers over
            for server in (self.redis, self.postgres):
                if server is not None:
                    server.stop()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
