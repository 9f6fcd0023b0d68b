"""SQLite state: which LP each station was given, and each station's imported-energy counter.

One connection, used from one thread. Every write is its own small transaction; WAL journal mode
with synchronous=NORMAL means a committed transaction survives the process being killed.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)

# Marks a file as ours (PRAGMA application_id), so a SQLite file that belongs to something else is
# refused instead of having our tables written into it. The value spells "oWBe".
APPLICATION_ID = 0x6F574265

_HINT = "move it away or pass --state-db"

# Statements, not one script: executescript() would commit on its own, outside our transaction.
_SCHEMA_V1 = (
    "CREATE TABLE lp_assignment (serial TEXT PRIMARY KEY, lp INTEGER NOT NULL UNIQUE)",
    "CREATE TABLE energy (serial TEXT PRIMARY KEY, imported_wh REAL NOT NULL)",
)


class StoreError(Exception):
    """The state file cannot be used; the message is one line meant for the user."""


class Store:
    """Energy counters and station -> LP assignments, kept in one SQLite file."""

    SCHEMA_VERSION = 1

    def __init__(self, path: str | Path) -> None:
        """Open the state file at ``path``, creating it (and its directory) if missing.

        Raises StoreError if the file is not a usable state file; an existing file is never
        deleted or replaced.
        """
        self.path = str(path)
        self._conn: sqlite3.Connection | None = None
        if self.path != ":memory:":
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create the directory for state file {self.path} ({exc.strerror})"
                ) from exc
        try:
            # Autocommit mode: transactions are opened explicitly in _transaction(), and PRAGMAs
            # such as journal_mode must not run inside an implicit one.
            conn = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state file {self.path} ({exc})") from exc
        try:
            self._open(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _open(self, conn: sqlite3.Connection) -> None:
        # Everything up to the schema decision only reads, so a file we refuse stays untouched;
        # switching to WAL rewrites the header and therefore comes last.
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as exc:
            if "not a database" in str(exc):
                raise StoreError(
                    f"state file {self.path} is not a SQLite database ({exc}); {_HINT}"
                ) from exc
            raise StoreError(f"state file {self.path} is corrupt ({exc}); {_HINT}") from exc
        if problems != ["ok"]:
            raise StoreError(
                f"state file {self.path} is corrupt (quick_check: {_first_problem(problems)}); "
                f"{_HINT}"
            )
        is_new = version == 0 and app_id == 0 and objects == 0
        if not is_new and app_id != APPLICATION_ID:
            raise StoreError(
                f"state file {self.path} is a SQLite database of another application "
                f"(application_id {app_id}); {_HINT}"
            )
        if version > self.SCHEMA_VERSION:
            raise StoreError(
                f"state file {self.path} has schema version {version}, newer than the "
                f"{self.SCHEMA_VERSION} this release understands; use a newer release or "
                f"pass --state-db"
            )
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode not in ("wal", "memory"):
                log.warning(
                    "state file %s: WAL not available, using journal mode %s", self.path, mode
                )
            conn.execute("PRAGMA synchronous=NORMAL")
            if is_new:
                with _transaction(conn):
                    # Another process may have created the schema since we looked.
                    if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                        for statement in _SCHEMA_V1:
                            conn.execute(statement)
                        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                        conn.execute(f"PRAGMA user_version = {self.SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot initialise state file {self.path} ({exc})") from exc

    def close(self) -> None:
        """Close the connection; calling it again does nothing."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        # Callers only need to know about StoreError, not about sqlite3.
        conn = self._connection()
        try:
            with _transaction(conn):
                yield conn
        except sqlite3.Error as exc:
            raise StoreError(f"state file {self.path}: cannot {what} ({exc})") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"state file {self.path} is closed")
        return self._conn

    def _read(self, sql: str, what: str) -> list[Any]:
        try:
            return self._connection().execute(sql).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"state file {self.path}: cannot {what} ({exc})") from exc

    # LP assignments

    def lp_assignments(self) -> dict[str, int]:
        """Return serial -> LP number for every station that has one."""
        rows = self._read("SELECT serial, lp FROM lp_assignment", "read LP assignments")
        return {serial: int(lp) for serial, lp in rows}

    def assign_lp(self, serial: str, lp: int) -> None:
        """Give ``lp`` to ``serial``, moving it from its old LP and from any other holder."""
        with self._write("assign LP") as conn:
            previous = conn.execute(
                "SELECT serial FROM lp_assignment WHERE lp = ? AND serial != ?", (lp, serial)
            ).fetchone()
            if previous is not None:
                log.info("LP%d moves from station %s to station %s", lp, previous[0], serial)
                conn.execute("DELETE FROM lp_assignment WHERE lp = ?", (lp,))
            conn.execute(
                "INSERT INTO lp_assignment (serial, lp) VALUES (?, ?) "
                "ON CONFLICT (serial) DO UPDATE SET lp = excluded.lp",
                (serial, lp),
            )

    def forget_lp(self, serial: str) -> None:
        """Remove the LP assignment of ``serial``, if any."""
        with self._write("forget LP") as conn:
            conn.execute("DELETE FROM lp_assignment WHERE serial = ?", (serial,))

    # energy

    def energy_wh(self) -> dict[str, float]:
        """Return serial -> imported energy in Wh for every station with a counter."""
        rows = self._read("SELECT serial, imported_wh FROM energy", "read energy counters")
        return {serial: float(wh) for serial, wh in rows}

    def save_energy(self, counters: dict[str, float]) -> None:
        """Store the given counters in one transaction.

        A counter never goes backwards: a value below the stored one (or one that is negative or
        not finite) is ignored for that serial, with a warning.
        """
        with self._write("save energy counters") as conn:
            for serial, value in counters.items():
                wh = float(value)
                if not math.isfinite(wh) or wh < 0:
                    log.warning("station %s: ignoring invalid energy counter %r Wh", serial, wh)
                    continue
                row = conn.execute(
                    "SELECT imported_wh FROM energy WHERE serial = ?", (serial,)
                ).fetchone()
                if row is not None and wh < row[0]:
                    log.warning(
                        "station %s: ignoring energy counter %.3f Wh, below the stored %.3f Wh",
                        serial,
                        wh,
                        row[0],
                    )
                    continue
                conn.execute(
                    "INSERT INTO energy (serial, imported_wh) VALUES (?, ?) "
                    "ON CONFLICT (serial) DO UPDATE SET imported_wh = excluded.imported_wh",
                    (serial, wh),
                )


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    # BEGIN IMMEDIATE takes the write lock up front, so a transaction that read a value cannot
    # lose a race to another writer (e.g. a second process on the same file) before it writes.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        # SQLite may already have rolled back by itself (e.g. disk full); a second ROLLBACK
        # would fail and hide the original error.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _first_problem(problems: list[str]) -> str:
    # quick_check returns many multi-line rows; the user needs one line, the first real finding.
    lines = [
        line.strip()
        for row in problems
        for line in str(row).splitlines()
        if line.strip() and not line.startswith("***")
    ]
    if not lines:
        return "unknown problem"
    more = f" and {len(lines) - 1} more" if len(lines) > 1 else ""
    return lines[0] + more
