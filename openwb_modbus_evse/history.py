"""The power chart's data: average watts per charge point per minute, for the last 48 hours.

Compact and bounded: one ring of at most ``window / bucket`` integers (or None for "no data")
per station serial; the series of a charge point that no longer exists is dropped. Samples
(every few seconds, by the service) are summed into the open bucket; a bucket is closed when
the next one begins. The rings are kept in the state file as named records (``history/<serial>``)
written in batches by the service (:data:`SAVE_INTERVAL` and at shutdown), never per sample.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 5.0  # seconds between two samples: the default poll interval
BUCKET = 60.0  # seconds averaged into one value
WINDOW = 48 * 3600.0  # seconds kept
SAVE_INTERVAL = 300.0  # seconds between two writes of the state file's records
RECORD = "history/"  # state-file record prefix; the key ends with the station serial


@dataclass
class _Series:
    end: int  # index (unix time // bucket) after the last closed bucket
    values: deque[int | None]
    open_index: int | None = None  # the bucket being summed
    total: float = 0.0
    count: int = field(default=0)


class PowerHistory:
    """Rings of average watts per minute (None: no data), by station serial."""

    def __init__(
        self, interval: float = SAMPLE_INTERVAL, bucket: float = BUCKET, window: float = WINDOW
    ) -> None:
        self.interval = interval
        self.bucket = bucket
        self.size = int(window // bucket)
        self._series: dict[str, _Series] = {}
        self._changed: set[str] = set()  # serials whose record is out of date (or to delete)

    def sample(self, powers: Iterable[tuple[str, float | None]], at: float) -> None:
        """Add one sample per station (unix time ``at``); stations not among ``powers`` lose
        their series."""
        index = int(at // self.bucket)
        seen = set()
        for serial, watts in powers:
            seen.add(serial)
            series = self._series.get(serial)
            if series is None:
                series = self._series[serial] = _Series(index, deque(maxlen=self.size))
            if series.open_index is not None and series.open_index != index:
                self._close(serial, series)
            series.open_index = index
            if watts is not None:
                series.total += watts
                series.count += 1
        for serial in set(self._series) - seen:
            del self._series[serial]
            self._changed.add(serial)

    def _close(self, serial: str, series: _Series) -> None:
        index = series.open_index
        assert index is not None
        value = round(series.total / series.count) if series.count else None
        series.open_index, series.total, series.count = None, 0.0, 0
        if index < series.end:  # the clock went back: that minute is there already
            return
        gap = index - series.end
        if gap >= self.size:
            series.values.clear()
        else:
            series.values.extend([None] * gap)
        series.values.append(value)
        series.end = index + 1
        self._changed.add(serial)

    def series(self, serial: str) -> tuple[float, tuple[int | None, ...]]:
        """(unix time of the first value, the values oldest first); the last value is the open
        minute's average so far."""
        series = self._series.get(serial)
        if series is None:
            return 0.0, ()
        values = list(series.values)
        end = series.end
        if series.open_index is not None and series.open_index >= end:
            values.extend([None] * (series.open_index - end))
            values.append(round(series.total / series.count) if series.count else None)
            end = series.open_index + 1
        values = values[-self.size :]
        return (end - len(values)) * self.bucket, tuple(values)

    def seal(self) -> None:
        """Close every open minute (shutdown): its average so far is kept."""
        for serial, series in self._series.items():
            if series.open_index is not None:
                self._close(serial, series)

    # --- the state file -------------------------------------------------------------------

    def load(self, records: dict[str, Any]) -> None:
        """Take over the rings saved in the state file (``records`` with :data:`RECORD`)."""
        for key, record in records.items():
            serial = key.removeprefix(RECORD)
            try:
                end, values = int(record["end"]), record["w"]
                if not isinstance(values, list) or not all(
                    v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in values
                ):
                    raise ValueError("values")
            except (KeyError, TypeError, ValueError):
                log.warning("state file: power history record %s is damaged; ignored", key)
                continue
            self._series[serial] = _Series(end, deque(values[-self.size :], maxlen=self.size))

    def changed_records(self) -> dict[str, Any]:
        """The records to write (None: delete) since the last call."""
        changed = {}
        for serial in self._changed:
            series = self._series.get(serial)
            changed[RECORD + serial] = (
                None if series is None else {"end": series.end, "w": list(series.values)}
            )
        self._changed.clear()
        return changed

    def unsaved(self, records: dict[str, Any]) -> None:
        """Writing ``records`` failed: they are written with the next batch."""
        self._changed.update(key.removeprefix(RECORD) for key in records)
