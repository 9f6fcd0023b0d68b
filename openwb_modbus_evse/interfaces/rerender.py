"""Re-rendering what the view shows when it changes by time alone (data going stale, the plug
hold ending): no change event comes then, so an interface that publishes states sets a timer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from ..view import Viewable, next_change

K = TypeVar("K", bound=Hashable)


class ViewTimers(Generic[K]):
    """One timer per key (a tree, a station): ``render(key)`` runs when the view of the point
    last rendered for it changes by time alone."""

    def __init__(self, clock: Callable[[], float], render: Callable[[K], None]) -> None:
        self._clock = clock
        self._render = render
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._closed = False

    def rendered(self, key: K, point: Viewable | None) -> None:
        """``point`` was just rendered for ``key``: render it again when its view changes."""
        self.cancel(key)
        now = self._clock()
        when = next_change(point, now) if point is not None else None
        if when is not None and not self._closed:
            delay = when - now + 0.01  # just past the change
            self._timers[key] = asyncio.get_running_loop().call_later(delay, self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self._render(key)

    def cancel(self, key: K) -> None:
        """No re-render for ``key`` (it is gone)."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def close(self) -> None:
        """No re-render any more (shutdown)."""
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
