"""When `fashionrec up` restarts a process that died, and when it gives up on one.

Exponential backoff (tenacity's wait strategies, so the formula is a well-tested library's) and
a crash-loop limit: at most `limit` restarts within any `window_s` seconds; the next death
inside the window is a crash loop. Deaths older than the window are forgotten, so a process
that ran steadily for a window starts again from the shortest delay.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

from tenacity import RetryCallState
from tenacity.wait import wait_base, wait_exponential

BACKOFF_S = 0.5
BACKOFF_MAX_S = 30.0
RESTART_LIMIT = 5
RESTART_WINDOW_S = 300.0


def backoff(first_s: float = BACKOFF_S, max_s: float = BACKOFF_MAX_S) -> wait_base:
    """first_s, 2·first_s, 4·first_s, … capped at max_s."""
    return wait_exponential(multiplier=first_s, max=max_s)


@dataclass
class RestartPolicy:
    """One per supervised process; `now` comes from the caller's clock (tests pass a fake)."""

    limit: int = RESTART_LIMIT
    window_s: float = RESTART_WINDOW_S
    wait: wait_base = field(default_factory=backoff)
    _deaths: deque[float] = field(default_factory=deque, init=False, repr=False)

    def restart_delay(self, now: float) -> float | None:
        """The process died at `now`: seconds to wait before restarting it, None to give up."""
        while self._deaths and self._deaths[0] <= now - self.window_s:
            self._deaths.popleft()
        if len(self._deaths) >= self.limit:
            return None
        self._deaths.append(now)
        # tenacity's strategies read only the attempt number of a call state.
        state = RetryCallState(retry_object=cast(Any, None), fn=None, args=(), kwargs={})
        state.attempt_number = len(self._deaths)
        return float(self.wait(state))

    @property
    def recent_restarts(self) -> int:
        """Restarts counted against the limit (within the window of the last death)."""
        return len(self._deaths)
