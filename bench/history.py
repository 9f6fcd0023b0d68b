"""Part 9: the power history's costs with a full 48 h for nine stations (in-process).

What the page's history costs where it runs: a sample (every 5 s, on the event loop), the batch
written to the state file (every 5 min), the /api/status body the page fetches every 3 s, and the
state file's size.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from bench.report import section, table
from openwb_modbus_evse.config import MAX_LP
from openwb_modbus_evse.history import BUCKET, PowerHistory
from openwb_modbus_evse.store import Store


def _timed(fn: Callable[[], object], repeat: int) -> float:
    began = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - began) / repeat


async def bench_history(args: argparse.Namespace, workdir: Path) -> None:
    """Fill 48 h for MAX_LP stations, then measure sample, save and the JSON the page reads."""
    serials = [f"{i:032X}" for i in range(MAX_LP)]
    tracemalloc.start()
    history = PowerHistory()
    start = time.time() - 48 * 3600
    minutes = int(48 * 3600 // BUCKET)
    for m in range(minutes + 1):
        history.sample([(s, 1000.0 + m % 7000) for s in serials], start + m * BUCKET)
    memory = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    at = [start + (minutes + 1) * BUCKET]

    def sample() -> None:
        at[0] += 5
        history.sample([(s, 2000.0) for s in serials], at[0])

    sample_s = _timed(sample, 2000)
    db = workdir / "history.sqlite3"
    with Store(db) as store:
        records = history.changed_records()
        began = time.perf_counter()
        store.save_records(records)
        save_s = time.perf_counter() - began
    size = os.path.getsize(db)
    body = json.dumps([{"start": h[0], "w": list(h[1])} for h in map(history.series, serials)])
    encode_s = _timed(
        lambda: json.dumps(
            [{"start": h[0], "w": list(h[1])} for h in map(history.series, serials)]
        ),
        20,
    )
    section(
        f"power history: {MAX_LP} stations x 48 h (1-minute buckets, {minutes} values each)",
        table(
            ["measure", "value"],
            [
                ["one sample of all stations (event loop)", f"{sample_s * 1e6:.0f} us"],
                ["save of all records (one transaction)", f"{save_s * 1000:.1f} ms"],
                ["state file size", f"{size / 1024:.0f} KiB"],
                [
                    "/api/history (JSON, the page fetches it once a minute)",
                    f"{len(body) / 1024:.0f} KiB",
                ],
                ["its encoding (worker thread)", f"{encode_s * 1000:.1f} ms"],
                ["memory of the rings", f"{memory / 1024:.0f} KiB"],
            ],
        ),
        [
            "a sample runs every 5 s, a save every 5 min and at shutdown; /api/status (every "
            "3 s) carries no history",
        ],
    )
