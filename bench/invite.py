"""Bulk invitations: a 10,000-row CSV through `gatepass invite --csv`, then `gatepass worker`
delivering every invitation to a local aiosmtpd.

    .venv/bin/python bench/invite.py [--rows 10000] [--database-url URL]

Prints invitations/s created and mails/s delivered (docs/performance.md, "Invitations").
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import free_port
from aiosmtpd.controller import Controller


class Counter:
    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.count += 1
        return "250 OK"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    args = parser.parse_args()
    gatepass = shutil.which("gatepass") or str(Path(sys.executable).parent / "gatepass")
    work = Path(tempfile.mkdtemp(prefix="gatepass-bench-invite-"))
    path = work / "invitees.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["email", "first_name", "last_name", "account", "roles"])
        for i in range(args.rows):
            writer.writerow([f"invitee{i}@example.com", f"First{i}", "Tester", "", ""])
    counter = Counter()
    port = free_port()
    smtp = Controller(counter, hostname="127.0.0.1", port=port)
    smtp.start()
    env = {**os.environ, "GATEPASS_DATABASE_URL": args.database_url or f"sqlite:///{work}/g.db",
           "GATEPASS_VAR_DIR": str(work / "var"), "GATEPASS_SMTP_URL": f"smtp://127.0.0.1:{port}",
           "GATEPASS_WORKER": "external", "GATEPASS_SECRET_KEY": "bench-" + "x" * 40}
    subprocess.run([gatepass, "migrate"], env=env, check=True, capture_output=True)
    try:
        started = time.perf_counter()
        subprocess.run([gatepass, "invite", "--csv", str(path)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        created = time.perf_counter() - started
        print(f"created {args.rows} invitations in {created:.2f} s "
              f"({args.rows / created:.0f} invitations/s, process start included)")
        worker = subprocess.Popen([gatepass, "worker"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        started = time.perf_counter()
        deadline = started + 600
        while counter.count < args.rows and time.perf_counter() < deadline:
            time.sleep(0.05)
        delivered = time.perf_counter() - started
        worker.terminate()
        worker.wait(timeout=30)
        print(f"delivered {counter.count} mails in {delivered:.2f} s "
              f"({counter.count / delivered:.0f} mails/s)")
    finally:
        smtp.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
