"""Command line: serve, simulate, status, registers, mosquitto-config, demo, config-reference."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import click

from . import config as config_mod
from .evse.protocol import Proximity

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    # pymodbus logs every refused request and dropped client at ERROR/WARNING; ours say it better.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


def _host_port(value: str, default_port: int) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[IPv6]:PORT``."""
    host, port = value, ""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":")
    elif value.count(":") == 1:
        host, port = value.split(":")
    if port and not port.isdigit():
        raise click.BadParameter(f"{value!r} is not HOST:PORT")
    return host, int(port) if port else default_port


def _run_service(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when it is installed (optional extra ``fast``: a faster event
    loop for the Modbus server), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


async def _until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)``; SIGINT and SIGTERM set ``stop``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await main(stop)


@click.group()
@click.version_option(package_name="openwb-modbus-evse")
def main() -> None:
    """Serve Dehne-EVSE charging stations as openWB series2 charge points over Modbus TCP."""


def _setting_options(command: Callable[..., None]) -> Callable[..., None]:
    """One option per key of the settings table (``config.Settings``), with its default shown."""
    for key in reversed(config_mod.keys(config_mod.Settings)):
        shown = str(key.default).lower() if isinstance(key.default, bool) else key.default
        if isinstance(key.default, tuple):  # lists: as typed on the command line
            shown = ",".join(map(str, key.default))
        kind = key.info.cli_type or (key.type if key.type in (str, int, float, bool) else str)
        command = click.option(
            f"--{key.name.replace('_', '-')}",
            key.name,
            type=kind,
            help=f"{key.info.help}  [default: {shown}]",
        )(command)
    return command


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@_setting_options
@click.option(
    "--bridge-publish-topic",
    help="Rust-bridge messages: the publish topic (other half of --bridge-topics).",
)
@click.option(
    "--bridge-subscribe-topic",
    help="Rust-bridge messages: the subscribe topic (other half of --bridge-topics).",
)
@click.option("--check-config", is_flag=True, help="Validate the configuration and exit.")
def serve(config_path: str | None, check_config: bool, **overrides: Any) -> None:
    """Run the bridge."""
    try:
        settings = config_mod.load(config_path, overrides)
    except config_mod.ConfigError as err:
        click.echo(f"config error: {err}", err=True)
        sys.exit(2)
    warnings = config_mod.warnings(settings)
    if check_config:
        for warning in warnings:
            click.echo(f"warning: {warning}", err=True)
        click.echo(f"config OK: {len(settings.station)} station(s) configured")
        return
    _setup_logging(settings.log_level)
    for warning in warnings:
        logging.getLogger(__name__).warning("%s", warning)
    from .service import Service
    from .store import StoreError

    async def run(stop: asyncio.Event) -> None:
        service = Service(settings)
        try:
            await service.start()
        except (StoreError, OSError, config_mod.ConfigError) as err:
            await service.stop()
            raise click.ClickException(str(err)) from None
        await stop.wait()
        logging.getLogger(__name__).info("stopping")
        await service.stop()

    _run_service(_until_signal(run))


@main.command()
@click.option(
    "--bridge",
    "bridge_addr",
    default="127.0.0.1:9091",
    show_default=True,
    help="HOST:PORT of the bridge.",
)
@click.option(
    "--count", default=1, show_default=True, type=click.IntRange(1, 500), help="Number of stations."
)
@click.option("--serial", help="Serial (32 hex digits) of a single station.")
@click.option(
    "--firmware",
    default=4,
    show_default=True,
    type=click.IntRange(0, 255),
    help="Firmware version.",
)
@click.option(
    "--plug-in-after",
    type=float,
    default=2.0,
    show_default=True,
    help="Seconds until the vehicle plugs in (-1: never).",
)
@click.option(
    "--unplug-after",
    type=float,
    default=None,
    help="Seconds after plug-in until it unplugs.  [default: never]",
)
@click.option(
    "--vehicle-current",
    type=float,
    default=16.0,
    show_default=True,
    help="The vehicle's current limit in A.",
)
@click.option(
    "--vehicle-phases",
    type=click.Choice(["1", "3"]),
    default="3",
    show_default=True,
    help="Phases the vehicle charges on.",
)
@click.option(
    "--cable",
    type=click.Choice(["13", "20", "32", "none"]),
    default="32",
    show_default=True,
    help="Cable rating the proximity pilot shows.",
)
@click.option("--log-level", default="INFO", show_default=True)
def simulate(
    bridge_addr: str,
    count: int,
    serial: str | None,
    firmware: int,
    plug_in_after: float,
    unplug_after: float | None,
    vehicle_current: float,
    vehicle_phases: str,
    cable: str,
    log_level: str,
) -> None:
    """Run virtual Dehne-EVSE stations with virtual vehicles."""
    from .tools.simulator import VehicleConfig, run_simulators

    if serial is not None and count != 1:
        raise click.UsageError("--serial names one station; drop --count")
    _setup_logging(log_level.upper())
    vehicle = VehicleConfig(
        plug_in_after=None if plug_in_after < 0 else plug_in_after,
        unplug_after=unplug_after,
        max_current_a=vehicle_current,
        phases=int(vehicle_phases),
    )
    proximity = {
        "13": Proximity.CABLE_13A,
        "20": Proximity.CABLE_20A,
        "32": Proximity.CABLE_32A,
        "none": Proximity.NO_CABLE,
    }[cable]

    async def run(stop: asyncio.Event) -> None:
        await run_simulators(
            _host_port(bridge_addr, 9091),
            count=count,
            serial=serial.upper() if serial else None,
            firmware=firmware,
            vehicle=vehicle,
            proximity=proximity,
            stop=stop,
        )

    asyncio.run(_until_signal(run))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=1502, show_default=True)
@click.option("--unit", default=1, show_default=True, help="Modbus unit ID.")
@click.option("--watch", is_flag=True, help="Refresh in place until Ctrl-C.")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
@click.option(
    "--metrics-port",
    default=9502,
    show_default=True,
    help="This service's metrics port, for the controller column; 0 = do not ask.",
)
def status(
    host: str,
    port: int,
    unit: int,
    watch: bool,
    interval: float,
    as_json: bool,
    metrics_port: int,
) -> None:
    """Show every charge point of an openWB Rev2.0 secondary (this service or a real openWB)."""
    from .tools.status import run

    sys.exit(
        run(
            host,
            port,
            unit,
            watch=watch,
            interval=interval,
            as_json=as_json,
            metrics_port=metrics_port or None,
        )
    )


@main.command("mosquitto-config")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option(
    "--address",
    "addresses",
    multiple=True,
    metavar="[PREFIX=]IP",
    help="Address the openWB primary connects to for the trees without a prefix (IP), or with "
    "one (lp3/=IP); repeat for each prefix.",
)
@click.option("--port", default=1883, show_default=True, help="Port of the primaries' listeners.")
def mosquitto_config(config_path: str | None, addresses: tuple[str, ...], port: int) -> None:
    """Print a mosquitto configuration for the configured charge points (openWB MQTT API)."""
    from .interfaces.mosquitto_config import build

    try:
        settings = config_mod.load(config_path)
    except config_mod.ConfigError as err:
        click.echo(f"config error: {err}", err=True)
        sys.exit(2)
    by_prefix = {}
    for item in addresses:
        prefix, _, address = item.rpartition("=")
        by_prefix[prefix] = address
    text, warnings = build(settings, by_prefix, port)
    click.echo(text)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)


@main.command()
@click.option("--markdown", is_flag=True, help="Print a Markdown table (for docs).")
@click.option(
    "--lp",
    default=1,
    show_default=True,
    type=click.IntRange(1, config_mod.MAX_LP),
    help="Show addresses of this LP (LP10 and up: at the next unit IDs).",
)
def registers(markdown: bool, lp: int) -> None:
    """Print the register map (register_map.csv)."""
    from .interfaces.modbus.registers import REGISTER_MAP, format_table

    units, block = divmod(lp - 1, config_mod.LPS_PER_UNIT)
    if units:
        click.echo(
            f"LP{lp} is served at unit ID unit_id + {units} (unit {1 + units} with the default "
            f"unit_id = 1), in the block of LP{block + 1}:"
        )
    click.echo(format_table(REGISTER_MAP, block + 1, markdown=markdown))


@main.command("config-reference")
def config_reference() -> None:
    """Print the configuration reference: docs/configuration.md (`make docs` writes it)."""
    click.echo(config_mod.reference_markdown(), nl=False)


@main.command()
@click.option("--state-db", default=None, help="State file.  [default: a temporary file]")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Listen address of all three ports (0.0.0.0 lets other machines in).",
)
@click.option("--evse-port", default=9091, show_default=True, help="Port for the stations.")
@click.option("--modbus-port", default=1502, show_default=True, help="Modbus TCP port.")
@click.option("--metrics-port", default=9502, show_default=True, help="Prometheus port.")
@click.option(
    "--admin-token",
    default=None,
    help="Token for the actions (page controls, CLI).  [default: a new one, printed at start]",
)
@click.option(
    "--mqtt-host",
    default="",
    help="An MQTT broker: the stations appear in Home Assistant, which drives LP2.",
)
@click.option("--mqtt-port", default=1883, show_default=True, help="MQTT broker port.")
def demo(
    state_db: str | None,
    host: str,
    evse_port: int,
    modbus_port: int,
    metrics_port: int,
    mqtt_host: str,
    mqtt_port: int,
    admin_token: str | None,
) -> None:
    """The service, two virtual stations with vehicles and a controller, all in one process."""
    from .tools.demo import run_demo

    _setup_logging("INFO")
    if admin_token is None:
        admin_token = secrets.token_urlsafe(18)
    else:
        try:
            config_mod.check_admin_token("admin_token", admin_token)
        except config_mod.ConfigError as err:
            raise click.BadParameter(str(err), param_hint="--admin-token") from None
    ports = {"evse_port": evse_port, "modbus_port": modbus_port, "metrics_port": metrics_port}

    async def run(stop: asyncio.Event) -> None:
        try:
            await run_demo(stop, state_db, host, admin_token, mqtt=(mqtt_host, mqtt_port), **ports)
        except OSError as err:  # a port in use: one line, as serve says it
            raise click.ClickException(
                f"{err} (is the service or another demo running? Stop it, or give the demo "
                "other ports: --evse-port, --modbus-port, --metrics-port)"
            ) from None

    asyncio.run(_until_signal(run))


# --- actions on a running service (its admin API) -------------------------------------------

_admin_options = [
    click.option(
        "--url",
        default="http://127.0.0.1:9502",
        show_default=True,
        help="The service's HTTP address (metrics_host:metrics_port).",
    ),
    click.option(
        "--token",
        envvar="OPENWB_MODBUS_EVSE_TOKEN",
        default="",
        help="admin_token of the service (or env OPENWB_MODBUS_EVSE_TOKEN).",
    ),
]


def _admin(command: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(_admin_options):
        command = option(command)
    return command


def _call(url: str, token: str, method: str, path: str, **kw: Any) -> dict[str, Any]:
    from .tools.admin import AdminError, call

    try:
        return call(url, token, method, path, **kw)
    except AdminError as err:
        raise click.ClickException(str(err)) from None


@main.command()
@_admin
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
def stations(url: str, token: str, as_json: bool) -> None:
    """List the stations of a running service (connected or remembered)."""
    from .tools.admin import format_stations

    found = _call(url, token, "GET", "/api/stations")["stations"]
    click.echo(json.dumps(found, indent=2) if as_json else format_stations(found))


@main.command()
@_admin
@click.argument("serial")
@click.argument("lp", type=click.IntRange(1, config_mod.MAX_LP))
def move(url: str, token: str, serial: str, lp: int) -> None:
    """Serve station SERIAL as LP (a free one) from now on."""
    body = json.dumps({"lp": lp}).encode()
    _call(url, token, "POST", f"/api/stations/{serial}/move", body=body)
    click.echo(f"station {serial} is LP{lp} now")


@main.command()
@_admin
@click.argument("serial")
def confirm(url: str, token: str, serial: str) -> None:
    """Confirm that the device now claiming station SERIAL's ID (from a new address) is it."""
    answer = _call(url, token, "POST", f"/api/stations/{serial}/confirm")
    click.echo(f"station {serial} is served from {answer['peer']} now")


@main.command()
@_admin
@click.argument("serial")
def forget(url: str, token: str, serial: str) -> None:
    """Forget station SERIAL (not connected): its LP is free again."""
    _call(url, token, "POST", f"/api/stations/{serial}/forget")
    click.echo(f"station {serial} forgotten")


@main.command()
@_admin
@click.argument("serial")
@click.argument("name", type=click.Choice(config_mod.CONTROLLERS))
def controller(url: str, token: str, serial: str, name: str) -> None:
    """Let controller NAME drive station SERIAL from now on ("manual": the owner)."""
    body = json.dumps({"controller": name}).encode()
    _call(url, token, "POST", f"/api/stations/{serial}/controller", body=body)
    click.echo(f"station {serial} is driven by {name} now")


@main.command()
@_admin
@click.argument("serial")
@click.argument("amps", type=click.FloatRange(0, 32))
def current(url: str, token: str, serial: str, amps: float) -> None:
    """Charge station SERIAL at AMPS (0 stops); its controller must be "manual"."""
    body = json.dumps({"amps": amps}).encode()
    _call(url, token, "POST", f"/api/stations/{serial}/current", body=body)
    click.echo(
        f"station {serial}: {amps:g} A, kept until changed" if amps else f"{serial}: stopped"
    )


@main.command()
@_admin
@click.argument("serial")
@click.argument("image", type=click.File("rb"))
@click.option(
    "--timeout",
    default=120.0,
    show_default=True,
    type=click.FloatRange(1, 240),
    help="Seconds the station may take to flash, restart and reconnect.",
)
def firmware(url: str, token: str, serial: str, image: Any, timeout: float) -> None:
    """Update the firmware of station SERIAL with IMAGE (it must not be charging)."""
    from .evse.protocol import MAX_FIRMWARE_SIZE

    data = image.read()
    # What the service would refuse at once is said before "sending": a wrong token, an
    # unknown, absent or charging station, an empty or too large image.
    if not data or len(data) > MAX_FIRMWARE_SIZE:
        raise click.ClickException(
            f"the image must be 1..{MAX_FIRMWARE_SIZE} bytes, {image.name} has {len(data)}"
        )
    serial = serial.upper()
    found = _call(url, token, "GET", "/api/stations")["stations"]
    station = next((s for s in found if s["serial"] == serial), None)
    if station is None:
        raise click.ClickException(f"404: no station {serial}")
    if not station["connected"]:
        raise click.ClickException(f"409: {station['name']} is not connected")
    if station["charging"]:
        raise click.ClickException(
            f"409: {station['name']} is charging (or its contactor is closed); stop it first"
        )
    click.echo(f"sending {len(data)} bytes to {serial}; waiting for it to restart ...")
    done = _call(
        url,
        token,
        "POST",
        f"/api/stations/{serial}/firmware?timeout={timeout:g}",
        body=data,
        content_type="application/octet-stream",
        timeout=timeout + 30,
    )
    click.echo(
        f"station {serial} is back after {done['seconds']} s with firmware "
        f"{done['firmware_after']} (was {done['firmware_before']})"
    )


if __name__ == "__main__":
    main()
