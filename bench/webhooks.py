"""bench/webhooks: N events fanned out to 5 local receivers; deliveries/s and p99 latency.

    .venv/bin/python bench/webhooks.py                      # 1,000 events, 5 receivers
    .venv/bin/python bench/webhooks.py --events 2000 --database-url sqlite

One `gatepass worker` process delivers; the receivers (a minimal asyncio HTTP/1.1 server on 5
ports, answering 204) run in a process of their own, so neither competes with this process,
which writes the events: one transaction per event, as use cases do, each fanned out to 5
webhook rows. Latency is from the event's `occurred_at` (its transaction) to its arrival at a
receiver. Results: docs/performance.md, "Webhooks".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from _common import add_database_option, database_url, free_port, fresh_database

GATEPASS = str(Path(sys.executable).parent / "gatepass")
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/gatepass_bench_webhooks"
SECRET = "w" * 40


# -- the receivers (run as a child process: `webhooks.py _receive OUT EXPECTED PORT…`) ----------

async def _serve(ports: list[int], out: str, expected: int) -> None:
    arrivals: list[tuple[float, str, str]] = []
    done = asyncio.Event()
    open_connections: set[asyncio.StreamWriter] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_connections.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                event = json.loads(body)
                arrivals.append((time.time(), event["id"], event["occurred_at"]))
                writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
                if len(arrivals) >= expected:
                    done.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    servers = [await asyncio.start_server(handle, "127.0.0.1", port, backlog=512)
               for port in ports]
    print("ready", flush=True)
    await done.wait()
    Path(out).write_text(json.dumps(arrivals))
    for server in servers:
        server.close()
    for writer in open_connections:  # kept-alive connections: end their handlers quietly
        writer.close()
    await asyncio.sleep(0.1)


# -- the bench ----------------------------------------------------------------------------------

def prepare(url: str, var_dir: str, ports: list[int]) -> None:
    from gatepass.context import Context
    from gatepass.core import build_core
    from gatepass.migrate import upgrade
    from gatepass.settings import load_settings
    from gatepass.webhooks import service as webhooks

    fresh_database(url)
    core = build_core(load_settings(database_url=url, var_dir=var_dir, secret_key=SECRET))
    upgrade(core.db.engine)
    with core.db.write() as session:
        core.site.update(session, {"webhooks.allow_insecure_urls": True})
    for port in ports:
        webhooks.create_webhook(core, Context("cli"), f"http://127.0.0.1:{port}/hook", ["*"])
    core.close()


def emit(url: str, var_dir: str, count: int) -> float:
    """Write `count` events, one transaction each; returns the seconds it took."""
    from gatepass.context import SYSTEM
    from gatepass.core import build_core
    from gatepass.events import service as events
    from gatepass.settings import load_settings

    core = build_core(load_settings(database_url=url, var_dir=var_dir, secret_key=SECRET))
    user = {"id": "00000000-0000-0000-0000-000000000000", "username": "bench",
            "email": "bench@example.com", "roles": [], "attributes": {}}
    started = time.perf_counter()
    for n in range(count):
        with core.db.write() as session:
            events.record(session, SYSTEM, "user.updated", {"user": {**user, "n": n}},
                          user_id=user["id"])
    took = time.perf_counter() - started
    core.close()
    return took


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_receive":
        out, expected, *ports = sys.argv[2:]
        asyncio.run(_serve([int(p) for p in ports], out, int(expected)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--receivers", type=int, default=5)
    add_database_option(parser, DEFAULT_PG)
    args = parser.parse_args()

    var_dir = tempfile.mkdtemp(prefix="gatepass-bench-")
    url = database_url(args.database_url, var_dir)
    expected = args.events * args.receivers
    ports = [free_port() for _ in range(args.receivers)]
    out = os.path.join(var_dir, "arrivals.json")
    receivers = subprocess.Popen([sys.executable, __file__, "_receive", out, str(expected),
                                  *map(str, ports)], stdout=subprocess.PIPE, text=True)
    assert receivers.stdout is not None and receivers.stdout.readline().strip() == "ready"
    print(f"{args.events} events x {args.receivers} receivers into {url.split('@')[-1]} ...",
          flush=True)
    prepare(url, var_dir, ports)
    env = {**os.environ, "GATEPASS_DATABASE_URL": url, "GATEPASS_VAR_DIR": var_dir,
           "GATEPASS_SECRET_KEY": SECRET, "GATEPASS_WORKER": "external",
           "GATEPASS_LOG_LEVEL": "WARNING"}
    worker = subprocess.Popen([GATEPASS, "worker"], env=env, stdout=subprocess.DEVNULL)
    try:
        time.sleep(2.0)  # let the worker boot: the clock measures delivery, not start-up
        started = time.time()
        emit_seconds = emit(url, var_dir, args.events)
        receivers.wait(timeout=300)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        if receivers.poll() is None:
            receivers.kill()
    arrivals = json.loads(Path(out).read_text())
    last = max(at for at, _, _ in arrivals)
    latencies = [at - datetime.fromisoformat(occurred).timestamp()
                 for at, _, occurred in arrivals]
    unique = len({event_id for _, event_id, _ in arrivals})
    total = last - started
    print(f"events={args.events} receivers={args.receivers} deliveries={len(arrivals)} "
          f"distinct events={unique}")
    print(f"writing the events: {emit_seconds:.2f} s = {args.events / emit_seconds:.0f} events/s")
    print(f"first event to last delivery: {total:.2f} s = {len(arrivals) / total:.0f} "
          f"deliveries/s")
    print(f"event-to-delivery latency: p50 {percentile(latencies, 50) * 1000:.0f} ms, "
          f"p99 {percentile(latencies, 99) * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
