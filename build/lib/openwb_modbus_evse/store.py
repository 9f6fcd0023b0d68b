"""SQLite state: which LP each station was given, each station's imported-energy counter, and
named JSON records for everything else a feature must keep across a restart (a station's last
plug state, an OCPP queue, the power history, ...).

One connection, used from one thread. Every write is its own small transaction; WAL journal mode
with synchronous=NORMAL means a committed transaction survives the process being killed.
"""

from __future__ import annotations

import json
import logging
import math
import os
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
# SQLite result codes (primary, the low byte of an extended code) that say the file could not
# be read or written: the file itself may be intact, so moving it away would lose the counters.
_ACCESS_ERRORS = {
    3: "no permission",  # SQLITE_PERM
    5: "locked by another process",  # SQLITE_BUSY
    6: "locked by another process",  # SQLITE_LOCKED
    8: "read-only",  # SQLITE_READONLY
    10: "I/O error",  # SQLITE_IOERR
    13: "disk full",  # SQLITE_FULL
    14: "cannot open the file or its -wal/-shm companions",  # SQLITE_CANTOPEN
}
_ACCESS_HINT = (
    "the file itself may be intact: check that the service may write its directory and "
    "that the disk is not full, then start again (do not move the file away)"
)

# Statements, not one script: executescript() would commit on its own, outside our transaction.
# _SCHEMA[n] takes a file from version n to n + 1.
_SCHEMA = (
    (
        "CREATE TABLE lp_assignment (serial TEXT PRIMARY KEY, lp INTEGER NOT NULL UNIQUE)",
        "CREATE TABLE energy (serial TEXT PRIMARY KEY, imported_wh REAL NOT NULL)",
    ),
    ("CREATE TABLE record (key TEXT PRIMARY KEY, value TEXT NOT NULL)",),
)
MAX_RECORD_BYTES = 4 * 1024 * 1024  # one record's JSON: a bug cannot fill the disk through it


class StoreError(Exception):
    """The state file cannot be used; the message is one line meant for the user."""


class Store:
    """Energy counters and station -> LP assignments, kept in one SQLite file."""

    SCHEMA_VERSION = len(_SCHEMA)

    def __init__(self, path: str | Path) -> None:
        """Open the state file at ``path``, creating it (and its directory) if missing.

        Raises StoreError if the file is not a usable state file; an existing file is never
        deleted or replaced.
        """
        self.path = str(path)
        self._conn: sqlite3.Connection | None = None
        self._file_id: tuple[int, int] | None = None  # (device, inode) of the file we opened
        if self.path != ":memory:":
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create the directory for state file {self.path} ({exc.strerror})"
                ) from exc
            self._refuse_empty_file()
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
        self._file_id = self._stat()

    def _refuse_empty_file(self) -> None:
        # SQLite takes a zero-length file for a new database and would start every counter at 0.
        # This service never leaves one behind (the header is written at once), so an empty file
        # is one that lost its content: a crash of the file system, a copy gone wrong.
        try:
            size = os.path.getsize(self.path)
            wal = os.path.getsize(self.path + "-wal") if os.path.exists(self.path + "-wal") else 0
        except OSError:
            return  # missing (created below) or unreadable (SQLite says why)
        if size == 0 and wal == 0 and os.path.isfile(self.path):
            raise StoreError(
                f"state file {self.path} is empty (0 bytes) but should hold the energy counters "
                f"and LP numbers; restore it from a backup, or delete it to start every counter "
                f"at 0"
            )

    def _stat(self) -> tuple[int, int] | None:
        if self.path == ":memory:":
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _open(self, conn: sqlite3.Connection) -> None:
        # Everything up to the schema decision only reads, so a file we refuse stays untouched;
        # switching to WAL rewrites the header and therefore comes last.
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as exc:
            access = _access_problem(exc)
            if access is not None:
                raise StoreError(
                    f"cannot read state file {self.path} ({access}: {exc}); {_ACCESS_HINT}"
                ) from exc
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
            if version < self.SCHEMA_VERSION:
                with _transaction(conn):
                    # Another process may have created or upgraded the schema since we looked.
                    now = conn.execute("PRAGMA user_version").fetchone()[0]
                    if (
                        now == 0
                        and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                    ):
                        return  # someone else's tables appeared meanwhile: leave them alone
                    for statements in _SCHEMA[now:]:
                        for statement in statements:
                            conn.execute(statement)
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {self.SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            access = _access_problem(exc)
            why = f"{access}: {exc}" if access else str(exc)
            raise StoreError(
                f"cannot initialise state file {self.path} ({why}); {_ACCESS_HINT}"
            ) from exc

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
        self._check_file()
        conn = self._connection()
        try:
            with _transaction(conn):
                yield conn
        except sqlite3.Error as exc:
            access = _access_problem(exc)
            why = f"{access}: {exc}" if access else str(exc)
            raise StoreError(f"state file {self.path}: cannot {what} ({why})") from exc

    def _check_file(self) -> None:
        """Say so when the file was deleted or replaced while running; write it again if gone.

        SQLite keeps writing to the inode it opened, so without this every count since the
        deletion would silently vanish with the process.
        """
        if self._file_id is None or self._conn is None:
            return
        now = self._stat()
        if now == self._file_id:
            return
        if now is not None:
            log.error(
                "state file %s was replaced while running; this process keeps using the file it "
                "opened, and the replacement is used from the next start",
                self.path,
            )
            self._file_id = now  # said once per replacement
            return
        log.error("state file %s disappeared while running; writing it again", self.path)
        # SQLite makes a connection to an unlinked file read-only, so the counters are copied
        # into a new file. Built under another name and moved in place once complete; the old
        # -wal/-shm belong to the deleted file and would be taken for the new one's.
        new = self.path + ".new"
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(new).unlink(missing_ok=True)
            copy = sqlite3.connect(new)
            try:
                self._conn.backup(copy)
            finally:
                copy.close()
            self._conn.close()
            for companion in ("-wal", "-shm"):
                Path(self.path + companion).unlink(missing_ok=True)
            os.replace(new, self.path)
            conn = sqlite3.connect(self.path, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"state file {self.path}: cannot write it again ({exc})") from exc
        self._conn = conn
        self._file_id = self._stat()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"state file {self.path} is closed")
        return self._conn

    def _read(self, sql: str, what: str) -> list[Any]:
        return self._read_args(sql, (), what)

    def _read_args(self, sql: str, args: tuple[Any, ...], what: str) -> list[Any]:
        try:
            return self._connection().execute(sql, args).fetchall()
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

    # named JSON records

    def records(self, prefix: str) -> dict[str, Any]:
        """Every record whose key starts with ``prefix``, decoded; a record that does not decode
        is skipped with a warning (it is replaced on its next save)."""
        rows = self._read_args(
            "SELECT key, value FROM record WHERE key >= ? AND key < ?",
            (prefix, prefix + "\uffff"),
            "read records",
        )
        found = {}
        for key, value in rows:
            try:
                found[key] = json.loads(value)
            except ValueError:
                log.warning("state file %s: record %s is not JSON; ignored", self.path, key)
        return found

    def save_records(self, records: dict[str, Any]) -> None:
        """Write records in one transaction; a value of None deletes the record."""
        encoded = {}
        for key, value in records.items():
            if value is not None:
                text = json.dumps(value, separators=(",", ":"))
                if len(text) > MAX_RECORD_BYTES:
                    raise StoreError(
                        f"state file {self.path}: record {key} has {len(text)} bytes, "
                        f"limit {MAX_RECORD_BYTES}"
                    )
                encoded[key] = text
        with self._write("save records") as conn:
            for key in records:
                if key in encoded:
                    conn.execute(
                        "INSERT INTO record (key, value) VALUES (?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (key, encoded[key]),
                    )
                else:
                    conn.execute("DELETE FROM record WHERE key = ?", (key,))


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


def _access_problem(exc: sqlite3.Error) -> str | None:
    """What kept SQLite from reading or writing the file, if that is what ``exc`` says."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else _ACCESS_ERRORS.get(code & 0xFF)


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
