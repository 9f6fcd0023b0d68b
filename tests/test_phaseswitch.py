"""The external phase-switch command: argument, exit code, timeout, missing program."""

import asyncio
import logging
import shlex
import sys

from openwb_modbus_evse.phaseswitch import run_switch_command


async def test_target_is_appended_and_exit_0_is_success(tmp_path):
    out = tmp_path / "args"
    script = f"import sys; open({str(out)!r}, 'w').write(' '.join(sys.argv[1:]))"
    command = shlex.join([sys.executable, "-c", script, "--relay", "two words"])
    assert await run_switch_command(command, 1, 5, "LP1") is True
    assert out.read_text() == "--relay two words 1"


async def test_non_zero_exit_is_a_logged_failure(caplog):
    command = shlex.join([sys.executable, "-c", "raise SystemExit(4)"])
    assert await run_switch_command(command, 3, 5, "LP1") is False
    assert "exit code 4" in caplog.text


async def test_a_hanging_command_is_killed_at_the_timeout(caplog):
    command = shlex.join([sys.executable, "-c", "import time; time.sleep(30)"])
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await run_switch_command(command, 1, 0.3, "LP1") is False
    assert loop.time() - started < 3
    assert "did not finish within 0.3 s" in caplog.text


async def test_a_missing_program_is_a_logged_failure(caplog):
    caplog.set_level(logging.ERROR)
    assert await run_switch_command("/nonexistent/relay", 1, 5, "LP1") is False
    assert "cannot run the phase-switch command" in caplog.text
