"""A token bucket: how often something a peer causes (a log line, a warning) may happen."""

from __future__ import annotations


class RateLimit:
    """At most ``burst`` events at once, refilled at ``per_second``; counts what it refuses."""

    def __init__(self, per_second: float, burst: float) -> None:
        self.per_second, self.burst = per_second, burst
        self._tokens = burst
        self._at: float | None = None
        self.dropped = 0  # refused since the last call of take_dropped()

    def allow(self, now: float) -> bool:
        """True if one event may happen at ``now`` (monotonic seconds)."""
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_second)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.dropped += 1
        return False

    def take_dropped(self) -> int:
        """How many events were refused since the last call."""
        dropped, self.dropped = self.dropped, 0
        return dropped

    def left_out(self) -> str:
        """The tail of a rate-limited log line: how many events were refused since the last."""
        dropped = self.take_dropped()
        return f" ({dropped} more since the last such line)" if dropped else ""
