"""The restart policy of `fashionrec up`: exponential backoff and the crash-loop limit, on a fake
clock (the policy takes `now` from its caller)."""

from __future__ import annotations

import pytest
from fashionrec_cli.restarts import RestartPolicy, backoff
from fashionrec_cli.settings import UpSettings


def test_backoff_doubles_until_the_crash_loop_limit() -> None:
    policy = RestartPolicy(limit=5, window_s=300, wait=backoff(0.5, 30))
    delays = [policy.restart_delay(now) for now in (0.0, 1.0, 3.0, 6.0, 11.0)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert policy.recent_restarts == 5
    assert policy.restart_delay(20.0) is None  # the 6th death within 300 s: a crash loop


def test_the_delay_is_capped() -> None:
    policy = RestartPolicy(limit=10, window_s=1000, wait=backoff(1, 5))
    assert [policy.restart_delay(float(t)) for t in range(5)] == [1, 2, 4, 5, 5]


def test_deaths_older_than_the_window_are_forgotten() -> None:
    policy = RestartPolicy(limit=2, window_s=60, wait=backoff(0.5, 30))
    assert policy.restart_delay(0.0) == 0.5
    assert policy.restart_delay(10.0) == 1.0
    assert policy.restart_delay(59.0) is None  # 3 deaths within 60 s
    # A process that then ran steadily for a window starts over from the shortest delay.
    assert policy.restart_delay(200.0) == 0.5
    assert policy.recent_restarts == 1
    # Sliding: the death at 200 still counts at 230, the one at 10 does not.
    assert policy.restart_delay(230.0) == 1.0
    assert policy.restart_delay(250.0) is None


def test_limit_zero_never_restarts() -> None:
    assert RestartPolicy(limit=0).restart_delay(0.0) is None


def test_settings_make_a_fresh_policy_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHIONREC_UP_RESTART_LIMIT", "1")
    monkeypatch.setenv("FASHIONREC_UP_RESTART_WINDOW_S", "10")
    monkeypatch.setenv("FASHIONREC_UP_RESTART_BACKOFF_S", "0.25")
    settings = UpSettings()
    first, second = settings.restart_policy(), settings.restart_policy()
    assert first.restart_delay(0.0) == 0.25
    assert first.restart_delay(1.0) is None
    assert second.restart_delay(1.0) == 0.25  # its own history
    assert UpSettings.model_fields["restart_limit"].default == 5
