"""Container health probes for the fashionrec images (stdlib + what every image has installed).

    healthcheck.py http URL      200 from URL (the HTTP services' /livez)
    healthcheck.py celery        a Celery worker on this host answers a broadcast ping
    healthcheck.py embedder      an embedder process on this host has a live heartbeat in Redis
    healthcheck.py auto          pick one of the above from the command PID 1 runs (the image's
                                 HEALTHCHECK; one-shot commands such as `migrate` count as healthy)

Exit status 0 = healthy, 1 = unhealthy, as Docker expects.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request
from pathlib import Path

DEFAULT_PORTS = {"gateway": 8000, "indexer": 8001}


def check_http(url: str, timeout: float = 4.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _broker_url() -> str:
    from fashionrec_shared.settings import BrokerSettings

    return BrokerSettings().url


def check_celery(timeout: float = 4.0) -> bool:
    """The worker of this container replies to a control ping (works while tasks run)."""
    from celery import Celery

    host = socket.gethostname()
    app = Celery("healthcheck", broker=_broker_url())
    try:
        replies = app.control.ping(timeout=timeout) or []
    except Exception:  # any broker failure means "not healthy", never a traceback
        return False
    return any(node.split("@", 1)[-1] == host for reply in replies for node in reply)


def check_embedder() -> bool:
    """A worker process here loaded the model and refreshes its heartbeat (TTL 30 s)."""
    import redis
    from fashionrec_shared.keys import embedder_alive_pattern

    host = socket.gethostname()
    try:
        client = redis.Redis.from_url(_broker_url(), socket_timeout=3)
        return any(True for _ in client.scan_iter(match=embedder_alive_pattern(host), count=500))
    except redis.RedisError:
        return False


def _main_command() -> list[str]:
    """Arguments of the fashionrec-* command PID 1 runs (directly or under docker-init)."""
    try:
        args = Path("/proc/1/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []
    return _main_command_from([a.decode(errors="replace") for a in args if a])


def _main_command_from(words: list[str] | tuple[str, ...]) -> list[str]:
    for i, word in enumerate(words):
        if os.path.basename(word).startswith("fashionrec-"):
            return list(words[i:])
    return []


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def check_auto() -> bool:
    args = _main_command()
    if len(args) < 2:
        return True  # no long-running fashionrec process to probe (e.g. --help)
    service = os.path.basename(args[0]).removeprefix("fashionrec-")
    command = args[1]
    if command == "serve" and service in DEFAULT_PORTS:
        env_port = os.environ.get(f"FASHIONREC_{service.upper()}_PORT")
        port = _option(args, "--port") or env_port or DEFAULT_PORTS[service]
        return check_http(f"http://127.0.0.1:{port}/livez")
    if command == "worker":
        return check_embedder() if service == "embedder" else check_celery()
    return True  # one-shot commands (migrate, rebuild)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    kind, rest = argv[0], argv[1:]
    if kind == "http" and len(rest) == 1:
        healthy = check_http(rest[0])
    elif kind == "celery":
        healthy = check_celery()
    elif kind == "embedder":
        healthy = check_embedder()
    elif kind == "auto":
        healthy = check_auto()
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
