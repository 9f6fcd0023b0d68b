"""A token bucket: how often something a peer causes (a log line, a warning) may happen.

Every log line a peer can cause passes one of these, named by its kind; what they leave out is
counted per kind for the whole process (``left_out_totals``, exported as a metric), so a flood
shows in the metrics while the log stays small.
"""

from __future__ import annotations

from collections import Counter

_LEFT_OUT: Counter[str] = Counter()


def left_out_totals() -> dict[str, int]:
    """Lines left out so far, by kind (a copy)."""
    return dict(_LEFT_OUT)


class RateLimit:
    """At most ``burst`` events at once, refilled at ``per_second``; counts what it refuses."""

    def __init__(self, per_second: float, burst: float, kind: str = "") -> None:
        self.per_second, self.burst = per_second, burst
        self.kind = kind  # the kind of log line it limits ("": not a log line)
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
        if self.kind:
            _LEFT_OUT[self.kind] += 1
        return False

    def available(self, now: float) -> bool:
        """True if an event could happen at ``now``, without using it up."""
        tokens = self._tokens
        if self._at is not None:
            tokens = min(self.burst, tokens + (now - self._at) * self.per_second)
        return tokens >= 1

    def take_dropped(self) -> int:
        """How many events were refused since the last call."""
        dropped, self.dropped = self.dropped, 0
        return dropped

    def left_out(self) -> str:
        """The tail of a rate-limited log line: how many events were refused since the last."""
        dropped = self.take_dropped()
        return f" ({dropped} more since the last such line)" if dropped else ""
