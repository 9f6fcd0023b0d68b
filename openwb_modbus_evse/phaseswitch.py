"""Runs the external command that switches a station's phase relay."""

from __future__ import annotations

import asyncio
import logging
import shlex

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
