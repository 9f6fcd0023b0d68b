"""Subprocesses of the bench: output to a log file each, and none outlives the bench."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from bench.report import BenchError
from tests.ports import free_port

HOST = "127.0.0.1"


class Child:
    """A subprocess of the bench; output goes to a log file, and it never outlives the bench."""

    running: ClassVar[list[Child]] = []
    _CLK_TCK = os.sysconf("SC_CLK_TCK")

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "wb") as out:
            # Own session: Ctrl-C reaches only the bench, which stops its children in order.
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=cwd,
                env=env,
            )
        Child.running.append(self)

    @property
    def pid(self) -> int:
        """Process ID."""
        return self.proc.pid

    def check_alive(self) -> None:
        """Raise BenchError (with the end of its log) if the process has exited."""
        code = self.proc.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with code {code}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the process's output."""
        with contextlib.suppress(OSError):
            text = self.log_path.read_text("utf-8", "replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def cpu_seconds(self) -> float:
        """User + system CPU time so far (from /proc/PID/stat)."""
        with open(f"/proc/{self.pid}/stat") as f:
            stat = f.read()
        # The command name (field 2) may hold spaces; the fields after it do not.
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / self._CLK_TCK  # utime, stime

    def memory_kib(self) -> tuple[int, int]:
        """Resident set size now and at its peak, in KiB (from /proc/PID/status)."""
        found: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for row in f:
                key, _, rest = row.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(rest.split()[0])
        return found.get("VmRSS", 0), found.get("VmHWM", 0)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s; idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ValueError):
            Child.running.remove(self)

    @classmethod
    def stop_all(cls) -> None:
        """Stop every child still running (the way out, also after Ctrl-C)."""
        for child in list(cls.running):
            child.stop(timeout=5.0)


class CpuMeter:
    """CPU use of a child and of the bench itself over a wall-clock window."""

    def __init__(self, child: Child) -> None:
        self._child = child
        self._start = (time.perf_counter(), child.cpu_seconds(), time.process_time())

    def percent(self) -> tuple[float, float]:
        """(child, bench) CPU use since creation, in % of one core."""
        wall, child, own = self._start
        elapsed = time.perf_counter() - wall
        return (
            100 * (self._child.cpu_seconds() - child) / elapsed,
            100 * (time.process_time() - own) / elapsed,
        )


async def wait_listening(port: int, child: Child, timeout: float = 15.0) -> None:
    """Return once ``port`` accepts connections; BenchError if ``child`` dies or is too slow."""
    deadline = time.perf_counter() + timeout
    while True:
        child.check_alive()
        try:
            _, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            if time.perf_counter() > deadline:
                raise BenchError(
                    f"{child.name} does not listen on port {port} after {timeout:g} s:\n"
                    f"{child.log_tail()}"
                ) from None
            await asyncio.sleep(0.05)
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return


@dataclass
class BridgeProcess:
    """``openwb-modbus-evse serve`` in a subprocess."""

    child: Child
    evse_port: int
    modbus_port: int
    argv: list[str]

    @property
    def options(self) -> str:
        """The command line, without the interpreter and the temporary paths."""
        shown, skip = [], False
        for arg in self.argv[2:]:
            if skip:
                shown.append("<tmp>")
                skip = False
                continue
            shown.append(arg)
            skip = arg == "--state-db"
        return " ".join(shown)


async def start_bridge(workdir: Path, name: str, *extra: str) -> BridgeProcess:
    """Start the bridge on free loopback ports with a fresh state file; wait until it listens."""
    evse_port, modbus_port = free_port(), free_port()
    argv = [
        sys.executable,
        "-m",
        "openwb_modbus_evse",
        "serve",
        "--evse-host",
        HOST,
        "--evse-port",
        str(evse_port),
        "--modbus-host",
        HOST,
        "--modbus-port",
        str(modbus_port),
        "--metrics-port",
        "0",
        "--state-db",
        str(workdir / f"{name}.sqlite3"),
        "--log-level",
        "WARNING",  # INFO would log every station connecting in the capacity runs
        *extra,
    ]
    child = Child(f"bridge ({name})", argv, workdir / f"{name}.log")
    await wait_listening(modbus_port, child)  # the Modbus server starts after the station link
    return BridgeProcess(child, evse_port, modbus_port, argv)


def public_id(workdir: Path, name: str, serial: str) -> str:
    """What the bridge ``name`` names a station by on MQTT (its key is in the state file)."""
    import json
    import sqlite3

    from openwb_modbus_evse.identity import PUBLIC_ID_KEY_RECORD
    from openwb_modbus_evse.identity import public_id as of

    uri = f"file:{workdir / f'{name}.sqlite3'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        row = db.execute(
            "SELECT value FROM record WHERE key = ?", (PUBLIC_ID_KEY_RECORD,)
        ).fetchone()
    return of(bytes.fromhex(json.loads(row[0])), serial)


async def start_mosquitto(workdir: Path) -> tuple[Child, int]:
    """A mosquitto on a free loopback port (Debian's, from /usr/sbin)."""
    path = shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if path is None:
        raise BenchError("the mqtt part needs mosquitto (apt-get install mosquitto)")
    port = free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(
        f"listener {port} {HOST}\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    child = Child("mosquitto", [path, "-c", str(config)], workdir / "mosquitto.log")
    await wait_listening(port, child)
    return child, port
