"""Settings of `fashionrec up` (env prefix FASHIONREC_UP_): how it keeps the stack alive."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from fashionrec_cli.restarts import (
    BACKOFF_MAX_S,
    BACKOFF_S,
    RESTART_LIMIT,
    RESTART_WINDOW_S,
    RestartPolicy,
    backoff,
)


class UpSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FASHIONREC_UP_", extra="ignore")

    # A process that died more than restart_limit times within restart_window_s is crash
    # looping: `up` stops everything and says which one, with its log tail.
    restart_limit: int = Field(default=RESTART_LIMIT, ge=0)
    restart_window_s: float = Field(default=RESTART_WINDOW_S, gt=0)
    # Delay before the first restart, doubling per restart within the window, capped.
    restart_backoff_s: float = Field(default=BACKOFF_S, gt=0)
    restart_backoff_max_s: float = Field(default=BACKOFF_MAX_S, gt=0)

    def restart_policy(self) -> RestartPolicy:
        """A fresh policy (one per supervised process: each has its own restart history)."""
        return RestartPolicy(
            limit=self.restart_limit,
            window_s=self.restart_window_s,
            wait=backoff(self.restart_backoff_s, self.restart_backoff_max_s),
        )
