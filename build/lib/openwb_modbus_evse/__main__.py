"""``python -m openwb_modbus_evse``."""

from .cli import main

main(prog_name="openwb-modbus-evse")
