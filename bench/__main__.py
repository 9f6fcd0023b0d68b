"""The bench's command line: ``python -m bench`` (``make bench``) from the repo root."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import logging
import os
import platform
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.capacity import bench_capacity
from bench.dimming import bench_dim
from bench.heartbeat import bench_heartbeat
from bench.history import bench_history
from bench.idle import bench_idle
from bench.latency import bench_bridge, bench_homeassistant, bench_latency, bench_mqtt
from bench.ocpp import bench_ocpp
from bench.processes import Child
from bench.report import BenchError, say
from bench.scrape import bench_scrape, run_scrapers
from bench.throughput import bench_modbus, run_plain_server

PARTS = (
    "modbus",
    "latency",
    "mqtt",
    "bridge",
    "homeassistant",
    "dim",
    "capacity",
    "heartbeat",
    "scrape",
    "idle",
    "ocpp",
    "history",
)


def conditions(args: argparse.Namespace, parts: Sequence[str]) -> str:
    """The conditions of this run, for the report header."""
    model = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((r.split(":", 1)[1].strip() for r in f if r.startswith("model name")), model)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = [
        ("date", time.strftime("%Y-%m-%d %H:%M:%S %Z")),
        (
            "CPU",
            f"{os.cpu_count()} logical CPUs ({len(os.sched_getaffinity(0))} usable), {model}",
        ),
        ("load average", f"{load} (1/5/15 min, at start)"),
        ("OS", f"{platform.system()} {platform.release()} {platform.machine()}"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("pymodbus", importlib.metadata.version("pymodbus")),
        ("bitstring", importlib.metadata.version("bitstring")),
        ("openwb-modbus-evse", importlib.metadata.version("openwb-modbus-evse")),
        ("parts", ", ".join(parts)),
        (
            "settings",
            f"--duration {args.duration:g} --warmup {args.warmup:g} "
            f"--clients {','.join(map(str, args.clients))} --writes {args.writes} "
            f"--stations {','.join(map(str, args.stations))} "
            f"--capacity-duration {args.capacity_duration:g} "
            f"--heartbeat-rounds {args.heartbeat_rounds} "
            f"--heartbeat-timeout {args.heartbeat_timeout:g} "
            f"--ocpp-stations {args.ocpp_stations}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def int_list(text: str) -> list[int]:
    """``"100,500"`` -> [100, 500]."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def part_list(text: str) -> list[str]:
    """``"modbus,latency"`` -> the parts, checked."""
    parts = [x.strip() for x in text.split(",") if x.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"parts are {', '.join(PARTS)}; got {text!r}")
    return [x for x in PARTS if x in parts]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the openWB Modbus <-> Dehne-EVSE bridge (about 2.5 min by default).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--only",
        type=part_list,
        default=",".join(PARTS),
        help=f"parts to run, of {','.join(PARTS)}",
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds measured per Modbus load run"
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument(
        "--clients", type=int_list, default="1,8", help="concurrent Modbus clients per run"
    )
    parser.add_argument("--writes", type=int, default=200, help="writes in the latency part")
    parser.add_argument(
        "--stations", type=int_list, default="100,1000,2000", help="station counts to try"
    )
    parser.add_argument(
        "--capacity-duration", type=float, default=30.0, help="seconds watched per station count"
    )
    parser.add_argument(
        "--heartbeat-rounds", type=int, default=5, help="heartbeat lapses to measure"
    )
    parser.add_argument(
        "--heartbeat-timeout", type=float, default=2.0, help="the bridge's --heartbeat-timeout"
    )
    parser.add_argument(
        "--ocpp-stations",
        type=int,
        default=200,
        help="stations, each with its own OCPP connection, in the ocpp part",
    )
    parser.add_argument(
        "--plain-server",
        type=int,
        metavar="PORT",
        help="only run the plain pymodbus reference server on PORT (used by the bench itself)",
    )
    parser.add_argument(
        "--scrapers",
        nargs=3,
        metavar=("N", "URL", "SECONDS"),
        help="only run N scrapers of URL for SECONDS (used by the bench itself)",
    )
    return parser.parse_args(argv)


async def run(args: argparse.Namespace, workdir: Path) -> None:
    """Every selected part, in order."""
    # SIGTERM cancels like Ctrl-C does, so that every finally block stops its subprocesses.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    benches = {
        "modbus": bench_modbus,
        "latency": bench_latency,
        "mqtt": bench_mqtt,
        "bridge": bench_bridge,
        "homeassistant": bench_homeassistant,
        "dim": bench_dim,
        "capacity": bench_capacity,
        "heartbeat": bench_heartbeat,
        "scrape": bench_scrape,
        "idle": bench_idle,
        "ocpp": bench_ocpp,
        "history": bench_history,
    }
    for part in args.only:
        await benches[part](args, workdir)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; exit code 0 on success."""
    args = parse_args(argv)
    if args.plain_server is not None:
        run_plain_server(args.plain_server)
        return 0
    if args.scrapers is not None:
        count, url, seconds = args.scrapers
        run_scrapers(int(count), url, float(seconds))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # pymodbus logs every closed connection; the simulator every (re)connect.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    # A thousand stations need a thousand sockets here and in the bridge (which inherits this).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * max(args.stations) + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))

    print("openwb-modbus-evse bench")
    print(conditions(args, args.only), flush=True)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="openwb-bench-") as tmp:
        try:
            asyncio.run(run(args, Path(tmp)))
        except (KeyboardInterrupt, asyncio.CancelledError):
            say("interrupted")
            return 130
        except BenchError as err:
            say(f"bench failed: {err}")
            return 1
        finally:
            Child.stop_all()
    print(f"\ntotal time {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
