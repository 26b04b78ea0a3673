"""Chaos: the embedder and the broker die while a catalogue of 30 is ingested.

The embedder runs as configured by default (see test_prefork.py for its prefork pool). Each
test starts `fashionrec ingest` (its function, in a thread) on a fresh catalogue, waits until
the embedder has taken the catalogue's embed task and not finished it (mid-batch), kills, and
lets the ingest run to its end. Whatever was lost must come back by itself: Celery's redelivery
for a lost pool child, the pending sweep for a task that died with its worker or its broker.
"""

from __future__ import annotations

import signal

import pytest

from tests.chaos.conftest import (
    ChaosStack,
    assert_found,
    assert_ingested,
    start_ingest_and_wait_mid_batch,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]


def test_embedder_main_killed_mid_batch(chaos_stack: ChaosStack) -> None:
    """SIGKILL of the embedder's main process: `up` kills its orphaned pool child, starts it
    again, and the task it held (unacknowledged in Redis until the visibility timeout) is
    re-sent by the pending sweep once the items have been pending for 6 s."""
    future, task, offset, probe = start_ingest_and_wait_mid_batch(chaos_stack, seed=12)
    worker_log = chaos_stack.service_log("indexer-worker")
    sweeps_before = worker_log.read_text(errors="replace").count("pending sweep: re-queued")
    main = chaos_stack.embedder()
    main.send_signal(signal.SIGKILL)
    wait_for(
        lambda: "embedder-0 was killed by SIGKILL; restarting it" in chaos_stack.supervisor_log(),
        30,
        "up did not see the embedder die",
    )

    summary = future.result(timeout=240)
    assert_ingested(summary)
    log = chaos_stack.service_log("embedder-0").read_bytes()[offset:].decode(errors="replace")
    killed_run = log.split("--- fashionrec up: restarting embedder-0 ---")[0]
    assert f"embed_items[{task}] succeeded" not in killed_run, "killed after the task finished"
    assert worker_log.read_text(errors="replace").count("pending sweep: re-queued") > sweeps_before
    counts = chaos_stack.assert_invariant(probe)
    assert counts["failed"] == 0, counts
    assert_found(chaos_stack, probe, summary, "SYN12-00000")
    assert not main.is_running() or main.status() == "zombie"
    assert chaos_stack.embedder().pid != main.pid


def test_redis_killed_during_ingest(chaos_stack: ChaosStack) -> None:
    """SIGKILL of the embedded Redis while the first of three batches is embedded and the others
    are uploaded: `up` restarts it on the same port with its append-only file; uploads meanwhile
    are 503 and `fashionrec ingest` sends them again; the task that was running is cancelled
    with the connection and re-sent by the pending sweep."""
    future, _, _, probe = start_ingest_and_wait_mid_batch(
        chaos_stack, seed=13, batch_size=10, concurrency=1
    )
    redis_server = chaos_stack.child("redis-server")
    assert redis_server is not None
    redis_server.send_signal(signal.SIGKILL)
    wait_for(
        lambda: "redis was killed by SIGKILL; restarting it" in chaos_stack.supervisor_log(),
        30,
        "up did not see Redis die",
    )

    def restarted() -> bool:
        new = chaos_stack.child("redis-server")
        return new is not None and new.pid != redis_server.pid

    wait_for(restarted, 60, "Redis was not started again")

    summary = future.result(timeout=240)
    assert_ingested(summary)
    counts = chaos_stack.assert_invariant(probe)
    assert counts["failed"] == 0, counts
    assert_found(chaos_stack, probe, summary, "SYN13-00000")
