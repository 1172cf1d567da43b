"""bench/mail: queue N messages, drain them to a local aiosmtpd server, report messages/s.

    .venv/bin/python bench/mail.py --mode serve            # one `gatepass serve` (inline worker)
    .venv/bin/python bench/mail.py --mode workers -n 2     # two `gatepass worker` processes

The database is PostgreSQL (GATEPASS_BENCH_DATABASE_URL, default a `gatepass_bench` database
on 127.0.0.1) or any URL given with --database-url. The SMTP server runs in this process; the
clock starts when the delivering processes are started (they have to boot) and stops when the
server has accepted the last message. Results: docs/performance.md, "Mail".
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import add_database_option, database_url, free_port, fresh_database
from aiosmtpd.controller import Controller

from gatepass.core import build_core
from gatepass.mail.service import queue_mail
from gatepass.migrate import upgrade
from gatepass.settings import load_settings

GATEPASS = str(Path(sys.executable).parent / "gatepass")
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/gatepass_bench"


class Counter:
    def __init__(self) -> None:
        self.count = 0
        self.ids: set[bytes] = set()
        self.first: float | None = None
        self.last: float | None = None
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content: bytes = envelope.original_content or envelope.content
        start = content.find(b"Message-ID: <")
        message_id = content[start + 13:content.find(b">", start)]
        with self.lock:
            self.count += 1
            self.ids.add(message_id)
            now = time.perf_counter()
            self.first = self.first or now
            self.last = now
        return "250 OK"


def prepare(url: str, count: int, var_dir: str) -> None:
    fresh_database(url)
    core = build_core(load_settings(database_url=url, var_dir=var_dir, secret_key="b" * 40))
    upgrade(core.db.engine)
    params = {"username": "someone", "how": None, "forgot_url": core.link("/password/forgot")}
    for start in range(0, count, 1000):
        with core.db.write() as session:
            for i in range(start, min(start + 1000, count)):
                queue_mail(session, core, "password_changed", f"user{i}@example.com", params)
    if url.startswith("postgresql"):
        with core.db.engine.connect() as connection:  # what autovacuum would do by now
            connection.exec_driver_sql("ANALYZE outbox")
    core.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("serve", "workers"), default="serve")
    parser.add_argument("-n", "--processes", type=int, default=2, help="workers (mode workers)")
    parser.add_argument("--count", type=int, default=10_000)
    add_database_option(parser, DEFAULT_PG)
    args = parser.parse_args()

    var_dir = tempfile.mkdtemp(prefix="gatepass-bench-")
    url = database_url(args.database_url, var_dir)
    counter = Counter()
    smtp_port = free_port()
    controller = Controller(counter, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    print(f"queueing {args.count} messages into {url.split('@')[-1]} ...", flush=True)
    prepare(url, args.count, var_dir)

    env = {**os.environ, "GATEPASS_DATABASE_URL": url, "GATEPASS_VAR_DIR": var_dir,
           "GATEPASS_SECRET_KEY": "b" * 40, "GATEPASS_SMTP_URL": f"smtp://127.0.0.1:{smtp_port}",
           "GATEPASS_LOG_LEVEL": "WARNING"}
    if args.mode == "serve":
        env["GATEPASS_WORKER"] = "inline"
        commands = [[GATEPASS, "serve", "--port", str(free_port())]]
    else:
        env["GATEPASS_WORKER"] = "external"
        commands = [[GATEPASS, "worker"] for _ in range(args.processes)]
    started = time.perf_counter()
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
                 for command in commands]
    try:
        while counter.count < args.count:
            if time.perf_counter() - started > 300:
                raise SystemExit(f"gave up after 300 s with {counter.count} delivered")
            if any(p.poll() is not None for p in processes):
                raise SystemExit("a delivering process exited early")
            time.sleep(0.01)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=60)
        controller.stop()
    assert counter.first is not None and counter.last is not None
    total = counter.last - started
    steady = counter.last - counter.first
    print(f"mode={args.mode} processes={len(processes)} messages={args.count} "
          f"duplicates={counter.count - len(counter.ids)}")
    print(f"end to end (incl. process start): {total:.2f} s = {args.count / total:.0f} msg/s")
    print(f"first to last delivery:           {steady:.2f} s = {args.count / steady:.0f} msg/s")


if __name__ == "__main__":
    main()
