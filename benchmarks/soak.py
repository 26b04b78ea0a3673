"""Soak: mixed traffic against `fashionrec up` while its children are killed at random.

Starts the stack (embedded services, temporary data dir; random:0 weights at 160 px, global
pooling, torch: the fastest model, the traffic is what is measured), then for `--minutes`:

* `--clients` threads send a mix of requests: add an item (POST /v1/items, sometimes a batch of
  2-4), search with a new photo of a stored garment, similar items of a stored item, delete a
  stored item, read an item;
* a killer sends SIGKILL, every `--kill-every MIN MAX` seconds (uniform), to one of the embedder
  main process, an embedder pool child (`--prefork` only: a batching embedder runs threads), the
  indexer worker, the indexer API, Redis, the Postgres postmaster or the gateway, then waits for
  /readyz (the recovery time); it never kills one child more than 3 times in 5 minutes, so
  `up`'s crash-loop limit (5 restarts in 300 s) is only reached by a real crash loop.

Per minute it prints requests, answers by status, p50/p95 latency and the kills (again as one
table at the end, with the errors by status and each operation's figures). At the end,
after the traffic stops and the pending sweep has had its time, the invariant:

* accepted = indexed + failed + deleted (nothing stays pending);
* no deleted item is returned by a search or similar that started after its DELETE returned 204;
* no 5xx but 503/504 (outages, with Retry-After): 500 and 502 are counted apart and shown;
* nothing of the stack is left running once it has stopped.

    .venv/bin/python benchmarks/soak.py --minutes 3 [--clients 3] [--kill-every 15 40] [--seed 0]
        [--prefork]

Writes benchmarks/results/soak.json (exit status 1 when the invariant does not hold).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from _stack import jpeg_bytes, percentile, running_stack
from fashionrec_cli.synthetic import generate_catalog, make_garment, perturb

STACK_ENV = {
    "FASHIONREC_EMBEDDER_POOLING": "global",
    "FASHIONREC_EMBEDDER_IMAGE_SIZE": "160",
    "FASHIONREC_EMBEDDER_RUNTIME": "torch",
    # Lost embed tasks are re-sent within the run (the default waits 15 minutes).
    "FASHIONREC_INDEXER_PENDING_TIMEOUT_S": "15",
    "FASHIONREC_INDEXER_PENDING_SWEEP_INTERVAL_S": "5",
    "FASHIONREC_INDEXER_REBUILD_INTERVAL_S": "10",
}
TARGETS = (
    "embedder",
    "embedder-pool-child",
    "indexer-worker",
    "indexer",
    "redis",
    "postgres",
    "gateway",
)
MARKERS = {
    "embedder": "fashionrec_embedder",
    "indexer-worker": "fashionrec_indexer worker",
    "indexer": "fashionrec_indexer serve",
    "redis": "redis-server",
    "gateway": "fashionrec_gateway",
}
# (operation, weight)
MIX = (("add", 3), ("add-batch", 1), ("search", 4), ("similar", 2), ("delete", 1), ("get", 1))
OUTAGE = {503, 504}
SETTLE_TIMEOUT_S = 240


@dataclass
class Record:
    minute: int
    op: str
    status: int | str  # HTTP status, or "connect-error" / "timeout" / "transport-error"
    ms: float
    detail: str = ""


@dataclass
class State:
    started: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    records: list[Record] = field(default_factory=list)
    live: list[str] = field(default_factory=list)  # accepted, not deleted
    accepted: set[str] = field(default_factory=set)
    deleted: dict[str, float] = field(default_factory=dict)  # item_id -> when its 204 came
    delete_sent: set[str] = field(default_factory=set)  # a DELETE went out (answer or not)
    violations: list[dict] = field(default_factory=list)
    kills: list[dict] = field(default_factory=list)
    next_sku: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def minute(self, at: float | None = None) -> int:
        return int(((at or time.monotonic()) - self.started) // 60)

    def sku(self) -> str:
        with self.lock:
            self.next_sku += 1
            return f"SOAK-{self.next_sku:06d}"


def status_of(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect-error"
    return "transport-error"


class Client(threading.Thread):
    def __init__(self, n: int, url: str, state: State, images: list[bytes], photos: list[bytes]):
        super().__init__(name=f"soak-client-{n}", daemon=True)
        self.url, self.state, self.images, self.photos = url, state, images, photos
        self.rnd = random.Random(1000 + n)
        self.http = httpx.Client(base_url=url, timeout=httpx.Timeout(45.0, connect=5.0))

    def run(self) -> None:
        ops, weights = zip(*MIX, strict=True)
        while not self.state.stop.is_set():
            op = self.rnd.choices(ops, weights)[0]
            started = time.monotonic()
            try:
                status, detail = getattr(self, op.replace("-", "_"))(started)
            except httpx.HTTPError as exc:
                status, detail = status_of(exc), repr(exc)[:200]
            except _Skip:
                continue
            record = Record(
                self.state.minute(started), op, status, (time.monotonic() - started) * 1000, detail
            )
            with self.state.lock:
                self.state.records.append(record)
            if isinstance(status, str) or status >= 500:
                self.state.stop.wait(0.2)  # a client backs off a little on outages
        self.http.close()

    def _pick(self) -> str:
        with self.state.lock:
            if not self.state.live:
                raise _Skip
            return self.rnd.choice(self.state.live)

    def _accepted(self, item_id: str) -> None:
        with self.state.lock:
            self.state.accepted.add(item_id)
            self.state.live.append(item_id)

    @staticmethod
    def _detail(response: httpx.Response) -> str:
        if response.status_code < 400:
            return ""
        try:
            return str(response.json().get("detail", ""))[:200]
        except ValueError:
            return response.text[:200]

    def add(self, started: float) -> tuple[int, str]:
        sku = self.state.sku()
        response = self.http.post(
            "/v1/items",
            files={"image": ("x.jpg", self.rnd.choice(self.images), "image/jpeg")},
            data={"metadata": json.dumps({"sku": sku, "title": sku, "price": 10.0})},
        )
        if response.status_code == 202:
            self._accepted(response.json()["item_id"])
        return response.status_code, self._detail(response)

    def add_batch(self, started: float) -> tuple[int, str]:
        n = self.rnd.randint(2, 4)
        skus = [self.state.sku() for _ in range(n)]
        response = self.http.post(
            "/v1/items/batch",
            files=[("image", ("x.jpg", self.rnd.choice(self.images), "image/jpeg")) for _ in skus],
            data={"metadata": json.dumps([{"sku": s, "title": s} for s in skus])},
        )
        if response.status_code == 207:
            for result in response.json()["results"]:
                if result["status"] == 202:
                    self._accepted(result["item_id"])
        return response.status_code, self._detail(response)

    def _check_results(self, response: httpx.Response, started: float, op: str) -> None:
        if response.status_code != 200:
            return
        with self.state.lock:
            for hit in response.json()["results"]:
                gone = self.state.deleted.get(hit["item_id"])
                if gone is not None and gone < started:
                    self.state.violations.append(
                        {"op": op, "item_id": hit["item_id"], "after_delete_s": started - gone}
                    )

    def search(self, started: float) -> tuple[int, str]:
        response = self.http.post(
            "/v1/search",
            params={"k": 10},
            files={"image": ("q.jpg", self.rnd.choice(self.photos), "image/jpeg")},
        )
        self._check_results(response, started, "search")
        return response.status_code, self._detail(response)

    def similar(self, started: float) -> tuple[int, str]:
        response = self.http.get(f"/v1/items/{self._pick()}/similar", params={"k": 10})
        self._check_results(response, started, "similar")
        return response.status_code, self._detail(response)

    def delete(self, started: float) -> tuple[int, str]:
        item_id = self._pick()
        with self.state.lock:
            self.state.delete_sent.add(item_id)
        response = self.http.delete(f"/v1/items/{item_id}")
        if response.status_code == 204:
            with self.state.lock:
                self.state.deleted[item_id] = time.monotonic()
                if item_id in self.state.live:
                    self.state.live.remove(item_id)
        return response.status_code, self._detail(response)

    def get(self, started: float) -> tuple[int, str]:
        response = self.http.get(f"/v1/items/{self._pick()}")
        return response.status_code, self._detail(response)


class _Skip(Exception):
    """Nothing to act on yet (no item stored)."""


def up_process() -> psutil.Process | None:
    for child in psutil.Process().children():
        try:
            if "fashionrec_cli" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def find_target(up: psutil.Process, target: str, data_dir: Path) -> psutil.Process | None:
    if target == "postgres":
        try:
            pid = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
            return psutil.Process(pid)
        except (OSError, ValueError, IndexError, psutil.NoSuchProcess):
            return None
    marker = MARKERS.get(target, MARKERS["embedder"])
    for child in up.children():
        try:
            if marker in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                if target == "embedder-pool-child":
                    pool = [p for p in child.children() if p.status() != psutil.STATUS_ZOMBIE]
                    return pool[0] if pool else None
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def wait_ready(url: str, up: psutil.Process, timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not up.is_running() or up.status() == psutil.STATUS_ZOMBIE:
            return None
        try:
            if httpx.get(f"{url}/readyz", timeout=3).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return None


def killer(url: str, data_dir: Path, state: State, args: argparse.Namespace, end: float) -> None:
    rnd = random.Random(args.seed)
    up = up_process()
    assert up is not None, "fashionrec up is not running"
    recent: dict[str, deque[float]] = defaultdict(deque)
    while not state.stop.wait(rnd.uniform(*args.kill_every)) and time.monotonic() < end:
        now = time.monotonic()
        for times in recent.values():
            while times and now - times[0] > 300:
                times.popleft()
        choices = [t for t in TARGETS if len(recent[t]) < 3]
        rnd.shuffle(choices)
        victim = next(
            ((t, p) for t in choices if (p := find_target(up, t, data_dir)) is not None), None
        )
        if victim is None:
            continue
        target, proc = victim
        killed_at = time.monotonic()
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue
        recent[target].append(killed_at)
        recovery = wait_ready(url, up, 180)
        kill = {
            "target": target,
            "pid": proc.pid,
            "at_s": round(killed_at - state.started, 1),
            "minute": state.minute(killed_at),
            "ready_after_s": None if recovery is None else round(recovery, 1),
        }
        with state.lock:
            state.kills.append(kill)
        print(f"  kill {target} (pid {proc.pid}) at {kill['at_s']}s: ready after "
              f"{kill['ready_after_s']}s", flush=True)  # fmt: skip
        if recovery is None and not up.is_running():
            print("  fashionrec up has exited: stopping the soak", flush=True)
            state.stop.set()


def minute_table(records: list[Record], kills: list[dict]) -> list[dict]:
    rows = []
    for minute in sorted({r.minute for r in records}):
        batch = [r for r in records if r.minute == minute]
        ms = [r.ms for r in batch]
        rows.append(
            {
                "minute": minute,
                "requests": len(batch),
                "statuses": dict(sorted(Counter(str(r.status) for r in batch).items())),
                "p50_ms": round(percentile(ms, 0.5), 1),
                "p95_ms": round(percentile(ms, 0.95), 1),
                "kills": [k["target"] for k in kills if k["minute"] == minute],
            }
        )
    return rows


def settle(url: str, state: State) -> dict[str, int | list]:
    """Wait (bounded) until no accepted, undeleted item is pending; count the outcomes."""
    statuses: dict[str, str] = {}
    errors: dict[str, str] = {}
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    with httpx.Client(base_url=url, timeout=10) as http:
        while True:
            for item_id in state.accepted:
                if statuses.get(item_id) in ("indexed", "failed", "deleted"):
                    continue
                if item_id in state.deleted:
                    statuses[item_id] = "deleted"
                    continue
                try:
                    response = http.get(f"/v1/items/{item_id}")
                except httpx.HTTPError:
                    continue
                if response.status_code == 200:
                    body = response.json()
                    statuses[item_id] = body["status"]
                    if body["status"] == "failed":
                        errors[item_id] = body.get("error") or ""
                elif response.status_code == 404:
                    # Deleted by a DELETE whose answer was lost (a killed gateway), or lost.
                    statuses[item_id] = "deleted" if item_id in state.delete_sent else "missing"
            pending = [i for i in state.accepted if statuses.get(i) not in
                       ("indexed", "failed", "deleted", "missing")]  # fmt: skip
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(1)
    counts = Counter(statuses.get(i, "unknown") for i in state.accepted)
    return {
        "accepted": len(state.accepted),
        "indexed": counts["indexed"],
        "failed": counts["failed"],
        "deleted": counts["deleted"],
        "pending": counts["pending"] + counts["unknown"],
        "missing": counts["missing"],  # accepted, not deleted, yet 404: lost
        "failed_reasons": dict(Counter(r.split(":")[0][:80] for r in errors.values())),
    }


def left_behind(work: Path) -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            environ = proc.info["environ"] or {}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if str(work) in cmdline or any(str(work) in v for v in environ.values()):
            found.append(f"{proc.info['pid']} {cmdline[:120]}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--kill-every", type=float, nargs=2, default=(15.0, 40.0),
                        metavar=("MIN_S", "MAX_S"))  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefork", action="store_true",
                        help="run the embedder's prefork pool (batching off), so that its pool "
                        "child is among the processes killed")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak.json")
    args = parser.parse_args()

    specs = generate_catalog(120, seed=args.seed, size=256)
    garments = [make_garment(spec) for spec in specs]
    images = [jpeg_bytes(g) for g in garments]
    photos = [jpeg_bytes(perturb(g, seed=n)) for n, g in enumerate(garments[:60])]

    stack_env = {**STACK_ENV, **({"FASHIONREC_EMBEDDER_BATCHING": "false"} if args.prefork else {})}
    with running_stack("random:0", stack_env) as stack:
        print(f"stack ready in {stack.seconds_to_ready:.1f}s at {stack.url}; soaking for "
              f"{args.minutes:g} min with {args.clients} clients", flush=True)  # fmt: skip
        state = State(started=time.monotonic())
        end = state.started + args.minutes * 60
        clients = [Client(n, stack.url, state, images, photos) for n in range(args.clients)]
        for client in clients:
            client.start()
        kill_thread = threading.Thread(
            target=killer, args=(stack.url, stack.work / "data", state, args, end), daemon=True
        )
        kill_thread.start()
        printed = 0
        while time.monotonic() < end and not state.stop.is_set():
            time.sleep(1)
            minute = state.minute()
            if minute > printed:
                with state.lock:
                    rows = minute_table(
                        [r for r in state.records if r.minute == printed], state.kills
                    )
                for row in rows:
                    print(f"minute {row['minute']}: {row['requests']} requests "
                          f"{row['statuses']} p50 {row['p50_ms']} ms p95 {row['p95_ms']} ms "
                          f"kills {row['kills']}", flush=True)  # fmt: skip
                printed = minute
        state.stop.set()
        for client in clients:
            client.join(60)
        kill_thread.join(200)
        up = up_process()
        up_alive = up is not None and wait_ready(stack.url, up, 180) is not None
        outcome = settle(stack.url, state) if up_alive else {"accepted": len(state.accepted)}
        log_tail = (stack.work / "up.log").read_text(errors="replace").splitlines()[-20:]
    leftovers = left_behind(stack.work)

    records = state.records
    statuses = Counter(str(r.status) for r in records)
    bad_5xx = [r for r in records if isinstance(r.status, int) and r.status >= 500
               and r.status not in OUTAGE]  # fmt: skip
    by_op = {
        op: {
            "requests": len(rs),
            "statuses": dict(sorted(Counter(str(r.status) for r in rs).items())),
            "p50_ms": round(percentile([r.ms for r in rs], 0.5), 1),
            "p95_ms": round(percentile([r.ms for r in rs], 0.95), 1),
        }
        for op in dict(MIX)
        if (rs := [r for r in records if r.op == op])
    }
    invariant = {
        "up_survived": up_alive,
        "nothing_pending": up_alive
        and outcome.get("pending") == 0
        and outcome.get("missing") == 0
        and outcome["accepted"] == outcome["indexed"] + outcome["failed"] + outcome["deleted"],
        "no_deleted_item_returned": not state.violations,
        "no_5xx_but_503_504": not bad_5xx,
        "nothing_left_running": not leftovers,
    }
    result = {
        "minutes": args.minutes,
        "clients": args.clients,
        "kill_every_s": list(args.kill_every),
        "seed": args.seed,
        "stack_env": stack_env,
        "seconds_to_ready": round(stack.seconds_to_ready, 1),
        "requests": len(records),
        "statuses": dict(sorted(statuses.items())),
        "by_operation": by_op,
        "per_minute": minute_table(records, state.kills),
        "kills": state.kills,
        "items": outcome,
        "deleted_returned": state.violations[:20],
        "bad_5xx": {
            "count": len(bad_5xx),
            "by_status": dict(Counter(str(r.status) for r in bad_5xx)),
            "samples": [
                {"minute": r.minute, "op": r.op, "status": r.status, "detail": r.detail}
                for r in bad_5xx[:20]
            ],
        },
        "left_running": leftovers,
        "up_log_tail": log_tail if not up_alive else [],
        "invariant": invariant,
        "invariant_holds": all(invariant.values()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    errors = {k: v for k, v in sorted(statuses.items()) if not k.isdigit() or int(k) >= 400}
    print(f"\n{len(records)} requests: {dict(sorted(statuses.items()))}")
    print(f"errors by status: {errors or 'none'}")
    print("over time:")
    for row in result["per_minute"]:
        print(f"  minute {row['minute']}: {row['requests']:6} requests  p50 {row['p50_ms']:8} ms  "
              f"p95 {row['p95_ms']:8} ms  {row['statuses']}  kills {row['kills']}")  # fmt: skip
    print("by operation:")
    for op, figures in by_op.items():
        print(f"  {op:10} {figures['requests']:6} p50 {figures['p50_ms']:8} ms  "
              f"p95 {figures['p95_ms']:8} ms  {figures['statuses']}")  # fmt: skip
    ready = [k["ready_after_s"] for k in state.kills if k["ready_after_s"] is not None]
    print(f"kills: {len(state.kills)} {dict(Counter(k['target'] for k in state.kills))}; "
          f"ready again after p50 {percentile(ready, 0.5) if ready else '-'} s, "
          f"max {max(ready) if ready else '-'} s")  # fmt: skip
    print(f"items: {outcome}")
    print(f"500/502: {result['bad_5xx']['count']} {result['bad_5xx']['by_status']}")
    for sample in result["bad_5xx"]["samples"][:5]:
        print(f"  {sample}")
    print(f"deleted items returned after their 204: {len(state.violations)}")
    print(f"left running: {leftovers or 'nothing'}")
    print(f"invariant: {invariant} -> {'holds' if result['invariant_holds'] else 'BROKEN'}")
    print(f"wrote {args.out}")
    sys.exit(0 if result["invariant_holds"] else 1)


if __name__ == "__main__":
    main()
