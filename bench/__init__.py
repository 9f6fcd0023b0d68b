"""Benchmarks of the bridge, run as ``python -m bench`` (``make bench``) from the repo root.

The parts, each against a fresh ``openwb-modbus-evse serve`` subprocess on free loopback ports:

1. ``modbus``: Modbus read throughput and latency (whole LP1 block, function code 4) with 1 and 8
   concurrent clients, side by side with a plain pymodbus server holding static registers (a
   subprocess too: ``python -m bench --plain-server PORT``) and a libmodbus server; the
   load comes from a C program on libmodbus (``make bench`` builds bench/bench_client.c and
   bench/bench_server.c into .venv/bin/; without them, pymodbus clients in this process).
2. ``latency``: from a write of the set-current register to the set-PWM command on the station.
   ``mqtt``: the same from an openWB primary's set_current over MQTT (a real mosquitto).
   ``bridge``: the same from a Rust-bridge ``request_set_pwm_percent`` over MQTT, and from a
   poll to its ``response_collect_data`` at a subscriber.
   ``homeassistant``: the same from Home Assistant's max-current number over MQTT.
3. ``capacity``: how many stations one bridge keeps polled on time, with its CPU and memory use.
4. ``heartbeat``: from the heartbeat deadline to the PWM-100 command.
5. ``scrape``: Modbus latency with 200 stations, quiet and while 20 scrapers hammer /metrics
   (a subprocess: ``python -m bench --scrapers N URL SECONDS``), and a burst of 300
   simultaneous scrapes.
6. ``idle``: Modbus latency, quiet and after 1000 connections that never send were opened (with
   the default connection caps, and with caps that hold them all).

The stations (and the controllers of parts 5 and 6) run in this process; register numbers come from
REGISTER_MAP, the station frames from the station connection (``evse/connection.py``). Nothing
here is collected by pytest.

``python -m bench.hostile`` is separate: the attacks of issue 19 against the service of any
checkout, for before/after figures (see its docstring and docs/development.md).
"""
