"""Chaos: a prefork pool child of the embedder dies mid-batch.

The embedder batches concurrent tasks in one process (a threads pool) by default; with batching
off it runs Celery's prefork pool, whose child embeds while the main process talks to Redis.
This module runs that mode, to kill the child.
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

STACK_ENV = {"FASHIONREC_EMBEDDER_BATCHING": "false"}


def test_pool_child_killed_mid_batch(chaos_stack: ChaosStack) -> None:
    """SIGKILL of the prefork child that embeds: Celery's main process sees the worker lost,
    the message goes back to the queue (acks late, reject on worker lost) and a new child,
    with the model loaded again, embeds the whole task."""
    future, task, offset, probe = start_ingest_and_wait_mid_batch(chaos_stack, seed=11)
    # The main process logs "received" before it hands the task to the child: wait until the
    # child works (CPU), still on that task, then kill it.
    child = chaos_stack.pool_child()
    busy_from = sum(child.cpu_times()[:2])
    wait_for(
        lambda: sum(child.cpu_times()[:2]) - busy_from >= 0.3 or future.done(),
        60,
        "the pool child never started embedding",
        poll=0.02,
    )
    assert chaos_stack.embed_task_running(offset) == task, "the task ended before the kill"
    child.send_signal(signal.SIGKILL)

    summary = future.result(timeout=240)
    assert_ingested(summary)
    log = chaos_stack.service_log("embedder-0").read_bytes()[offset:].decode(errors="replace")
    assert "WorkerLostError" in log, "the pool child was not killed while it embedded"
    counts = chaos_stack.assert_invariant(probe)
    assert counts["failed"] == 0, counts
    assert_found(chaos_stack, probe, summary, "SYN11-00000")
    assert "embedder-0 was killed" not in chaos_stack.supervisor_log()  # only the child died
