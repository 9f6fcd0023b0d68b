"""How it installs: the Makefile's split, the apt helper, the systemd unit and the scrape config."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_tool

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "contrib" / "openwb-modbus-evse.service"
SCRAPE_CONFIG = ROOT / "contrib" / "prometheus.yml"


def make(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# --- Makefile --------------------------------------------------------------------------------


def test_make_install_installs_the_service_and_nothing_for_the_tests(tmp_path):
    require_tool("make")
    done = make("-n", "install", f"VENV={tmp_path}/venv")
    assert done.returncode == 0, done.stderr
    assert "pip install --quiet -e '.[fast]'" in done.stdout
    for test_only in ("[test", "apt-install-no-services", "apt-get install -y", "-m pytest"):
        assert test_only not in done.stdout, test_only


def test_make_test_adds_the_test_tools_and_the_debian_peers(tmp_path):
    require_tool("make")
    done = make("-n", "test", f"VENV={tmp_path}/venv")
    assert done.returncode == 0, done.stderr
    assert "pip install --quiet -e '.[test,fast]'" in done.stdout
    assert "tools/apt-install-no-services mbpoll prometheus" in done.stdout
    assert done.stdout.rstrip().endswith(f"{tmp_path}/venv/bin/python -m pytest -q -n 4")


def test_make_says_what_to_install_when_python3_venv_is_missing(tmp_path):
    """Debian's python3 without python3-venv: one clear line instead of ensurepip's story."""
    require_tool("make")
    python = executable(
        tmp_path / "python3",
        f'#!/bin/sh\ncase "$*" in *ensurepip*) exit 1;; esac\nexec {sys.executable} "$@"\n',
    )
    done = make("install", f"VENV={tmp_path}/venv", f"PYTHON3={python}")
    assert done.returncode != 0 and not (tmp_path / "venv").exists()
    assert "sudo apt-get install python3-venv" in done.stdout + done.stderr


def test_make_says_when_python_is_too_old_or_missing(tmp_path):
    require_tool("make")
    old = executable(
        tmp_path / "python3", '#!/bin/sh\n[ "$1" = -V ] && echo Python 3.9.2\nexit 1\n'
    )
    done = make("install", f"VENV={tmp_path}/venv", f"PYTHON3={old}")
    assert done.returncode != 0 and "Python >= 3.11 is needed" in done.stdout + done.stderr
    done = make("install", f"VENV={tmp_path}/venv", f"PYTHON3={tmp_path}/missing")
    assert done.returncode != 0 and "sudo apt-get install python3 python3-venv" in done.stdout


# --- apt without services ----------------------------------------------------------------------


@pytest.fixture
def fake_system(tmp_path):
    """A system root with one service enabled before, and an apt-get whose package enables a
    new one (as Debian's prometheus does) and starts it unless policy-rc.d forbids that."""
    systemctl = require_tool("systemctl")
    root = tmp_path / "root"
    units = root / "lib" / "systemd" / "system"
    units.mkdir(parents=True)
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    for name in ("before", "fresh"):
        (units / f"{name}.service").write_text(
            "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n"
        )
    subprocess.run([systemctl, f"--root={root}", "enable", "before.service"], check=True)
    policy = tmp_path / "policy-rc.d"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    executable(
        bin_dir / "apt-get",
        f"""#!/bin/sh
echo "apt-get $*" >> {log}
[ "$1" = install ] || exit 0
{systemctl} --root={root} enable fresh.service 2>/dev/null
code=0
[ -x {policy} ] && {{ {policy} fresh.service start; code=$?; }}
[ $code = 101 ] && echo "fresh.service not started (policy 101)" >> {log}
[ $code = 101 ] || echo "fresh.service STARTED" >> {log}
""",
    )
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SYSTEM_ROOT": str(root),
        "POLICY_RC_D": str(policy),
    }
    return root, policy, log, env


def enabled(root: Path, unit: str) -> bool:
    done = subprocess.run(
        ["systemctl", f"--root={root}", "is-enabled", unit], capture_output=True, text=True
    )
    return done.stdout.strip() == "enabled"


def run_helper(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(ROOT / "tools" / "apt-install-no-services"), "prometheus"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def test_apt_helper_starts_and_enables_nothing_new(fake_system):
    root, policy, log, env = fake_system
    done = run_helper(env)
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    assert "apt-get install -y -qq --no-install-recommends prometheus" in lines
    assert "fresh.service not started (policy 101)" in lines  # nothing ran, not even briefly
    assert not enabled(root, "fresh.service")  # enabled by the package, disabled again
    assert enabled(root, "before.service")  # what was enabled before stays so
    assert not policy.exists()  # our policy-rc.d is gone again
    assert "disabling it again" in done.stdout


def test_apt_helper_keeps_the_systems_own_policy(fake_system):
    root, policy, _, env = fake_system
    system_policy = "#!/bin/sh\n# the admin's\nexit 101\n"
    executable(policy, system_policy)
    assert run_helper(env).returncode == 0
    assert policy.read_text() == system_policy
    assert not enabled(root, "fresh.service")


def test_apt_helper_removes_its_own_policy_left_by_a_killed_run(fake_system):
    _, policy, _, env = fake_system
    executable(
        policy,
        "#!/bin/sh\n# written by openwb-modbus-evse tools/apt-install-no-services\nexit 101\n",
    )
    assert run_helper(env).returncode == 0
    assert not policy.exists()


# --- systemd unit ------------------------------------------------------------------------------


def test_readme_shows_the_unit_file_from_contrib():
    readme = (ROOT / "docs" / "operations.md").read_text()
    assert f"```ini\n{UNIT.read_text()}```" in readme


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    """`verify` also checks that ExecStart exists: point it at this checkout's venv, which is
    what `make install` in /opt/openwb-modbus-evse makes there."""
    analyze = require_tool("systemd-analyze")
    text = UNIT.read_text()
    installed = "/opt/openwb-modbus-evse/.venv/bin/openwb-modbus-evse"
    assert f"ExecStart={installed} serve " in text
    program = Path(sys.executable).parent / "openwb-modbus-evse"
    assert program.exists()
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(installed, str(program)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    # and it is worth something: a broken setting fails
    unit.write_text(text.replace(installed, str(program)).replace("=yes", "=maybe"))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode != 0 and "maybe" in done.stderr


# --- Prometheus --------------------------------------------------------------------------------


def test_scrape_config_passes_promtool_and_targets_the_metrics_port():
    from openwb_modbus_evse.config import Settings

    promtool = require_tool("promtool")
    done = subprocess.run(
        [promtool, "check", "config", str(SCRAPE_CONFIG)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f'targets: ["localhost:{Settings().metrics_port}"]' in SCRAPE_CONFIG.read_text()
    assert "contrib/prometheus.yml" in (ROOT / "docs" / "metrics.md").read_text()


# --- README's development layout ---------------------------------------------------------------


def test_readme_development_layout_matches_the_tree():
    """Every module and top-level folder is in the README's layout, and everything there exists."""
    readme = (ROOT / "docs" / "development.md").read_text()
    block = readme.split("```\nopenwb_modbus_evse/ ", 1)[1].split("```", 1)[0]
    package = ROOT / "openwb_modbus_evse"
    listed = {package}
    for line in block.splitlines()[1:]:
        if line.startswith("  ") and not line.startswith("   "):
            listed.add(package / line.split()[0])
        elif line and not line.startswith(" "):
            listed.add(ROOT / line.split()[0])
    for path in listed:
        assert path.exists(), f"README lists {path.relative_to(ROOT)}, which does not exist"
    modules = {
        path
        for path in package.rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py") and "__pycache__" not in path.parts
    }
    missing = {path.relative_to(ROOT) for path in modules if path not in listed}
    assert not missing, f"the README's layout lacks {sorted(map(str, missing))}"
    folders = {
        path
        for path in ROOT.iterdir()
        if path.is_dir() and not path.name.startswith((".", "_")) and "egg-info" not in path.name
    }
    lacking = sorted(path.name for path in folders - listed)
    assert not lacking, f"the README's layout lacks {lacking}"
