"""Tests for the SQLite state store, against real files in tmp_path."""

from __future__ import annotations

import logging
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from openwb_modbus_evse.store import APPLICATION_ID, MAX_RECORD_BYTES, Store, StoreError

SERIAL_A = "0123456789abcdef0123456789abcdef"
SERIAL_B = "fedcba9876543210fedcba9876543210"
SERIAL_C = "00000000000000000000000000000001"


def _pragma(path: Path, name: str) -> object:
    # A separate connection sees what is really on disk, not the store's own view.
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


def test_missing_file_and_directory_are_created_with_wal(tmp_path: Path) -> None:
    path = tmp_path / "does" / "not" / "exist" / "state.db"
    with Store(path) as store:
        assert store.lp_assignments() == {}
        assert store.energy_wh() == {}
        assert path.is_file()
        assert _pragma(path, "journal_mode") == "wal"
        assert _pragma(path, "user_version") == Store.SCHEMA_VERSION


def test_accepts_str_path(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store(str(path)) as store:
        store.assign_lp(SERIAL_A, 1)
    with Store(path) as store:
        assert store.lp_assignments() == {SERIAL_A: 1}


def test_memory_database_works() -> None:
    with Store(":memory:") as store:
        store.assign_lp(SERIAL_A, 2)
        store.save_energy({SERIAL_A: 10.5})
        assert store.lp_assignments() == {SERIAL_A: 2}
        assert store.energy_wh() == {SERIAL_A: 10.5}


def test_state_persists_across_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = Store(path)
    store.assign_lp(SERIAL_A, 1)
    store.assign_lp(SERIAL_B, 4)
    store.save_energy({SERIAL_A: 1234.5, SERIAL_B: 0.25})
    store.close()

    store = Store(path)
    try:
        assert store.lp_assignments() == {SERIAL_A: 1, SERIAL_B: 4}
        assert store.energy_wh() == {SERIAL_A: 1234.5, SERIAL_B: 0.25}
    finally:
        store.close()


def test_close_is_idempotent_and_a_closed_store_refuses_use(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store(path) as store:
        store.save_energy({SERIAL_A: 1.0})
    store.close()  # already closed by the with block
    with pytest.raises(StoreError, match="closed"):
        store.energy_wh()
    with pytest.raises(StoreError, match="closed"):
        store.save_energy({SERIAL_A: 2.0})


def test_assign_lp_moves_a_serial_to_another_lp(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        store.assign_lp(SERIAL_A, 1)
        store.assign_lp(SERIAL_A, 3)
        assert store.lp_assignments() == {SERIAL_A: 3}


def test_assign_lp_held_by_another_serial_takes_it_away(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store(path) as store:
        store.assign_lp(SERIAL_A, 1)
        store.assign_lp(SERIAL_C, 2)
        store.assign_lp(SERIAL_B, 1)
        assert store.lp_assignments() == {SERIAL_B: 1, SERIAL_C: 2}
    with Store(path) as store:
        assert store.lp_assignments() == {SERIAL_B: 1, SERIAL_C: 2}


def test_assign_same_lp_again_is_a_no_op(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        store.assign_lp(SERIAL_A, 5)
        store.assign_lp(SERIAL_A, 5)
        assert store.lp_assignments() == {SERIAL_A: 5}


def test_forget_lp(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store(path) as store:
        store.assign_lp(SERIAL_A, 1)
        store.assign_lp(SERIAL_B, 2)
        store.forget_lp(SERIAL_A)
        store.forget_lp(SERIAL_C)  # unknown serial: nothing to do, no error
        assert store.lp_assignments() == {SERIAL_B: 2}
    with Store(path) as store:
        assert store.lp_assignments() == {SERIAL_B: 2}


def test_energy_never_goes_backwards(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.db"
    with Store(path) as store:
        store.save_energy({SERIAL_A: 100.0})
        with caplog.at_level(logging.WARNING, logger="openwb_modbus_evse.store"):
            store.save_energy({SERIAL_A: 50.0})
        assert store.energy_wh() == {SERIAL_A: 100.0}
        assert any(SERIAL_A in r.getMessage() for r in caplog.records)
        assert all(r.levelno == logging.WARNING for r in caplog.records)

        store.save_energy({SERIAL_A: 150.0})
        assert store.energy_wh() == {SERIAL_A: 150.0}
    with Store(path) as store:
        assert store.energy_wh() == {SERIAL_A: 150.0}


def test_lower_value_is_ignored_only_for_its_own_serial(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        store.save_energy({SERIAL_A: 100.0, SERIAL_B: 100.0})
        store.save_energy({SERIAL_A: 99.0, SERIAL_B: 101.0, SERIAL_C: 5.0})
        assert store.energy_wh() == {SERIAL_A: 100.0, SERIAL_B: 101.0, SERIAL_C: 5.0}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_invalid_energy_values_are_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: float
) -> None:
    with Store(tmp_path / "state.db") as store:
        store.save_energy({SERIAL_A: 10.0})
        with caplog.at_level(logging.WARNING, logger="openwb_modbus_evse.store"):
            store.save_energy({SERIAL_A: bad, SERIAL_B: bad})
        assert store.energy_wh() == {SERIAL_A: 10.0}
        assert len(caplog.records) == 2


# Files the store must refuse. Each builder writes its file and returns a fragment the error
# message must contain.


def _random_bytes(path: Path) -> str:
    path.write_bytes(os.urandom(8192))
    return "not a SQLite database"


def _store_with_data(path: Path) -> None:
    with Store(path) as store:
        for lp in range(1, 10):
            store.assign_lp(f"{lp:032x}", lp)
        store.save_energy({f"{i:032x}": float(i) for i in range(200)})


def _truncated(path: Path) -> str:
    _store_with_data(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "corrupt"


def _corrupted_page(path: Path) -> str:
    _store_with_data(path)
    data = bytearray(path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    # Smash the b-tree header of page 2; page 1 (the file header) stays valid.
    data[page_size : page_size + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    return "corrupt"


def _orphan_page(path: Path) -> str:
    # Every query still works; only the integrity check notices the page nothing points to.
    _store_with_data(path)
    data = bytearray(path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    pages = int.from_bytes(data[28:32], "big")
    data[28:32] = (pages + 1).to_bytes(4, "big")
    path.write_bytes(bytes(data) + bytes(page_size))
    return "quick_check"


def _newer_schema(path: Path) -> str:
    _store_with_data(path)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {Store.SCHEMA_VERSION + 1}")
    # Out of WAL, so a store that switched the journal mode before refusing would change the file.
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.close()
    return f"schema version {Store.SCHEMA_VERSION + 1}"


def _foreign_database(path: Path) -> str:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE someone_elses (x)")
    conn.commit()
    conn.close()
    return "another application"


@pytest.mark.parametrize(
    "build",
    [_random_bytes, _truncated, _corrupted_page, _orphan_page, _newer_schema, _foreign_database],
)
def test_unusable_file_is_refused_and_left_unchanged(
    tmp_path: Path, build: Callable[[Path], str]
) -> None:
    path = tmp_path / "state.db"
    expected = build(path)
    before = path.read_bytes()

    with pytest.raises(StoreError) as excinfo:
        Store(path)

    message = str(excinfo.value)
    assert str(path) in message
    assert expected in message
    assert "\n" not in message
    assert path.read_bytes() == before


def test_directory_as_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as excinfo:
        Store(tmp_path)
    assert str(tmp_path) in str(excinfo.value)
    assert tmp_path.is_dir()


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_committed_save_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    child = textwrap.dedent(
        f"""
        import os, signal, sys
        from openwb_modbus_evse.store import Store

        store = Store(sys.argv[1])
        store.assign_lp({SERIAL_A!r}, 7)
        store.save_energy({{{SERIAL_A!r}: 4321.5}})
        os.kill(os.getpid(), signal.SIGKILL)  # no close(), no checkpoint, no atexit
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    # The data lives only in the write-ahead log, so reopening really exercises recovery.
    assert path.with_name(path.name + "-wal").stat().st_size > 0

    with Store(path) as store:
        assert store.energy_wh() == {SERIAL_A: 4321.5}
        assert store.lp_assignments() == {SERIAL_A: 7}


# --- messages that say what is wrong (issue 10, finding 9) -----------------------------------


def _make_unwritable(directory: Path, path: Path) -> None:
    """The directory of an intact state file cannot be written (no -wal/-shm can be created)."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
    else:  # root writes anywhere: block the -wal file's name instead, the same SQLite error
        path.with_name(path.name + "-wal").mkdir()


def test_an_unwritable_directory_is_not_called_corrupt(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    path = directory / "state.db"
    _store_with_data(path)
    before = path.read_bytes()
    _make_unwritable(directory, path)
    try:
        with pytest.raises(StoreError) as excinfo:
            Store(path)
    finally:
        directory.chmod(0o755)
    message = str(excinfo.value)
    assert "cannot read state file" in message and "may be intact" in message
    assert "corrupt" not in message and "move it away" not in message
    assert path.read_bytes() == before


def test_a_full_disk_is_said_as_such(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        store._connection().execute("PRAGMA max_page_count = 8")  # a disk with no room left
        with pytest.raises(StoreError, match=r"cannot save energy counters \(disk full"):
            store.save_energy({f"{i:032x}": float(i) for i in range(2000)})


def test_an_empty_state_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.touch()
    with pytest.raises(StoreError, match=r"is empty \(0 bytes\) but should hold the energy"):
        Store(path)
    assert path.stat().st_size == 0


def test_a_state_file_deleted_while_running_is_reported_and_written_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.db"
    with Store(path) as store:
        store.assign_lp(SERIAL_A, 3)
        store.save_energy({SERIAL_A: 100.0})
        for name in (path.name, path.name + "-wal", path.name + "-shm"):
            (tmp_path / name).unlink(missing_ok=True)
        store.save_energy({SERIAL_A: 150.0})
        assert any("disappeared while running" in r.getMessage() for r in caplog.records)
        store.save_energy({SERIAL_A: 160.0})
    with Store(path) as store:
        assert store.energy_wh() == {SERIAL_A: 160.0}
        assert store.lp_assignments() == {SERIAL_A: 3}


def test_only_the_main_file_deleted_while_running(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store(path) as store:
        store.save_energy({SERIAL_A: 100.0})
        path.unlink()  # its -wal and -shm stay, in use by the open connection
        store.save_energy({SERIAL_A: 150.0})
    with Store(path) as store:
        assert store.energy_wh() == {SERIAL_A: 150.0}
        assert _pragma(path, "journal_mode") == "wal"


# --- named JSON records (schema 2) --------------------------------------------------------------


def test_records_round_trip_delete_and_survive_reopening(tmp_path):
    path = tmp_path / "state.sqlite3"
    with Store(path) as store:
        store.save_records({"plug/A": {"plugged": True, "at": 1.5}, "plug/B": [1, 2], "x/C": 3})
        store.save_records({"plug/B": None})  # None deletes
    with Store(path) as store:
        assert store.records("plug/") == {"plug/A": {"plugged": True, "at": 1.5}}
        assert store.records("x/") == {"x/C": 3}
        assert store.records("") == {"plug/A": {"plugged": True, "at": 1.5}, "x/C": 3}


def test_a_version_1_file_is_upgraded_and_keeps_its_counters(tmp_path):
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE lp_assignment (serial TEXT PRIMARY KEY, lp INTEGER NOT NULL UNIQUE)")
    conn.execute("CREATE TABLE energy (serial TEXT PRIMARY KEY, imported_wh REAL NOT NULL)")
    conn.execute("INSERT INTO energy VALUES ('A', 12.5)")
    conn.execute("INSERT INTO lp_assignment VALUES ('A', 3)")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with Store(path) as store:
        assert store.energy_wh() == {"A": 12.5} and store.lp_assignments() == {"A": 3}
        store.save_records({"k": "v"})
        assert store.records("k") == {"k": "v"}
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == Store.SCHEMA_VERSION == 2
    conn.close()


def test_an_oversized_record_is_refused_and_nothing_is_written(tmp_path):
    with Store(tmp_path / "s.sqlite3") as store:
        with pytest.raises(StoreError, match="limit"):
            store.save_records({"ok": 1, "big": "x" * (MAX_RECORD_BYTES + 1)})
        assert store.records("") == {}
