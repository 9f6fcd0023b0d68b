"""Runs the external command that switches a station's phase relay, when a charge point's phase
switch is ready for it (contactor open)."""

from __future__ import annotations

import asyncio
import logging
import shlex
from collections.abc import Callable

from . import chargepoint as cp
from .config import Settings

log = logging.getLogger(__name__)


async def run_switch_command(command: str, phases: int, timeout: float, name: str) -> bool:
    """Run ``command`` with ``phases`` appended (no shell); True if it exited 0 in time.

    Every failure is logged with the reason; a command still running after ``timeout``, or
    when the caller is cancelled, is killed.
    """
    argv = [*shlex.split(command), str(phases)]
    log.info("%s: switching to %d phase(s): %s", name, phases, shlex.join(argv))
    try:
        proc = await asyncio.create_subprocess_exec(*argv)
    except OSError as exc:
        log.error("%s: cannot run the phase-switch command: %s", name, exc)
        return False
    try:
        code = await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        log.error(
            "%s: phase-switch command did not finish within %g s; charging stays stopped",
            name,
            timeout,
        )
        return False
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if code != 0:
        log.error(
            "%s: phase-switch command failed (exit code %d); charging stays stopped", name, code
        )
    return code == 0


class PhaseSwitcher:
    """Starts the command of every charge point whose phase switch reached READY (subscribed to
    the registry's change events), and reports its end to the charge point."""

    def __init__(
        self, settings: Settings, clock: Callable[[], float], done: Callable[[bool], None]
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._done = done  # told every command's result (metrics)
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def changed(self, points: list[cp.ChargePoint]) -> None:
        """Change event: start the command where a switch is ready."""
        for point in points:
            seq = point.state.sequence
            serial = point.identity.serial
            if seq is None or seq.stage is not cp.Stage.READY or serial in self._tasks:
                continue
            point.commit(cp.phase_switch_started(point.state, self._clock()))
            task = asyncio.create_task(self._run(point))
            self._tasks[serial] = task
            task.add_done_callback(lambda _, serial=serial: self._tasks.pop(serial, None))

    async def _run(self, point: cp.ChargePoint) -> None:
        station = self._settings.station_by_serial(point.identity.serial)
        seq = point.state.sequence
        assert station is not None and station.phase_switch_command and seq and seq.phases
        ok = await run_switch_command(
            station.phase_switch_command,
            seq.phases,
            self._settings.phase_switch_timeout,
            point.name,
        )
        self._done(ok)
        point.commit(cp.phase_switch_finished(point.state, ok, self._clock()))

    async def stop(self) -> None:
        """Abandon (and kill) every command in flight."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
