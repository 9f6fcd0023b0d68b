"""``openwb-modbus-evse mosquitto-config``: a mosquitto configuration for the configured trees.

An openWB primary always connects to port 1883 of the address it is given, and one broker
endpoint carries one ``openWB/`` tree (two charge points: duo 0 and 1). Trees with a prefix
(``mqtt_prefix = "lp3/"``) need their own address, with a listener whose ``mount_point`` is the
prefix, so that the primary there sees plain ``openWB/...``. The service itself connects to a
listener without a mount point and sees every tree.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from ..config import Settings
from .openwb_mqtt import trees_of

OPENWB_PORT = 1883  # fixed in openWB's secondary module
MOUNT_POINTS_FIXED = (2, 0, 12)  # mosquitto issue 2244: delivered topics kept the mount prefix


def installed_version() -> tuple[int, int, int] | None:
    """The version of the mosquitto on this machine (None if there is none)."""
    path = shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "-h"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"mosquitto version (\d+)\.(\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def build(
    settings: Settings, addresses: dict[str, str], port: int = OPENWB_PORT
) -> tuple[str, list[str]]:
    """The configuration text and warnings; ``addresses`` maps a prefix ("" too) to its IP."""
    trees = trees_of(settings)
    prefixes = sorted({t.prefix for t in trees})
    warnings: list[str] = []
    lines = [
        "# mosquitto configuration for openwb-modbus-evse (made by: openwb-modbus-evse",
        "# mosquitto-config). Save it as /etc/mosquitto/conf.d/openwb-modbus-evse.conf and",
        "# restart mosquitto. Charge points:",
    ]
    for tree in trees:
        who = f"LP{tree.lp}" if tree.lp else f"station {tree.serial}"
        lines.append(f"#   {tree.name}  ({who})")
    lines += [
        "",
        "# The openWB primary logs in without a user name.",
        "allow_anonymous true",
        "# Commands are small messages: send them at once (Nagle would add ~40 ms per hop).",
        "set_tcp_nodelay true",
        "",
    ]
    mounted = [p for p in prefixes if p]
    if not mounted and "" not in addresses:
        lines += [f"# The openWB primary and the service connect to port {port} of this machine."]
        lines += [f"listener {port}", ""]
        if settings.mqtt_port != port:
            lines += [
                "# The service (mqtt_host = 127.0.0.1).",
                f"listener {settings.mqtt_port} 127.0.0.1",
                "",
            ]
        return "\n".join(lines), warnings
    if (addresses.get(""), port) != ("127.0.0.1", settings.mqtt_port):
        lines += [
            "# The service (mqtt_host = 127.0.0.1): every tree, no mount point.",
            f"listener {settings.mqtt_port} 127.0.0.1",
            "",
        ]
    for prefix in prefixes:
        address = addresses.get(prefix)
        if address is None:
            option = f"--address {prefix}=IP" if prefix else "--address IP"
            warnings.append(f"no address for the trees under {prefix or 'openWB/'}: give {option}")
            address = f"ADDRESS-FOR-{prefix or 'openWB/'}"
        names = ", ".join(t.name for t in trees if t.prefix == prefix)
        lines.append(f"# The openWB primary of {names} connects to {address}.")
        lines.append(f"listener {port} {address}")
        if prefix:
            lines.append(f"mount_point {prefix}")
        lines.append("")
    if mounted:
        version = installed_version()
        if version is None:
            warnings.append(
                "mosquitto is not installed here; mount points need mosquitto 2.0.12 or newer"
            )
        elif version < MOUNT_POINTS_FIXED:
            warnings.append(
                f"mosquitto {'.'.join(map(str, version))} is installed here: before 2.0.12 its "
                "mount points deliver topics with the prefix (mosquitto issue 2244), so the "
                f"primaries of {', '.join(mounted)} would see nothing. Upgrade mosquitto, or run "
                "one mosquitto per address (see the README)."
            )
    return "\n".join(lines), warnings
