"""Import speed and memory: N users with a precomputed bcrypt hash, via the API and the CLI.

    .venv/bin/python bench/import.py [--users 100000] [--backend sqlite|postgres|both]
                                     [--via api|cli|both]

Each run uses a fresh database and a real `gatepass` process (the CLI, or `gatepass serve`
fed one streamed POST /admin/api/v1/users/import). Reported: users/s over the whole command
or request, the CPU seconds that process spent on it (the machine's load moves the wall clock
more than it moves them), and its peak resident memory (VmHWM).
Bcrypt is hashed a few times and reused: hashing 100,000 passwords would be the benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import httpx
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
GATEPASS = str(ROOT / ".venv" / "bin" / "gatepass")
PG_ADMIN = os.environ.get("GATEPASS_BENCH_POSTGRES_URL",
                          "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def write_users(path: Path, count: int) -> None:
    hashes = [bcrypt.hashpw(f"password {n}".encode(), bcrypt.gensalt(rounds=10)).decode()
              for n in range(4)]
    with path.open("w") as handle:
        for n in range(count):
            handle.write(json.dumps({
                "username": f"user{n:07d}", "email": f"user{n:07d}@example.com",
                "first_name": "Bench", "last_name": f"User {n}", "email_verified": True,
                "password_hash": hashes[n % 4], "roles": ["Customer"] if n % 3 else [],
                "account": f"Account {n % 50}", "attributes": {"n": n}}) + "\n")


def fresh_database(backend: str, workdir: Path) -> str:
    if backend == "sqlite":
        path = workdir / f"bench-{time.monotonic_ns()}.db"
        return f"sqlite:///{path}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql('DROP DATABASE IF EXISTS "gatepass_bench" WITH (FORCE)')
        connection.exec_driver_sql('CREATE DATABASE "gatepass_bench"')
    admin.dispose()
    return sa.engine.make_url(PG_ADMIN).set(database="gatepass_bench") \
        .render_as_string(hide_password=False)


def env_for(url: str, workdir: Path) -> dict[str, str]:
    return {**os.environ, "GATEPASS_DATABASE_URL": url, "GATEPASS_VAR_DIR": str(workdir / "var"),
            "GATEPASS_SECRET_KEY": "bench-" + "x" * 40, "GATEPASS_WORKER": "external",
            "GATEPASS_LOG_LEVEL": "WARNING"}


def peak_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def via_cli(env: dict[str, str], file: Path) -> tuple[float, float, int, str]:
    subprocess.run([GATEPASS, "migrate"], env=env, check=True, capture_output=True)
    cpu_before = children_cpu()
    started = time.perf_counter()
    process = subprocess.Popen([GATEPASS, "users", "import", str(file)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = 0
    while process.poll() is None:
        peak = max(peak, peak_kib(process.pid))
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    cpu = children_cpu() - cpu_before
    summary = (process.stdout.read() if process.stdout else "").strip()
    if process.returncode != 0:
        raise SystemExit(f"the CLI import failed: {summary}")
    return elapsed, cpu, peak, summary


def chunks(file: Path) -> Iterator[bytes]:
    with file.open("rb") as handle:
        while chunk := handle.read(256 * 1024):
            yield chunk


def via_api(env: dict[str, str], file: Path) -> tuple[float, float, int, str]:
    key = subprocess.run([GATEPASS, "api-key", "create", "--name", "bench"], env=env, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([GATEPASS, "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=open(os.environ.get("BENCH_SERVER_LOG", os.devnull), "w"))
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("gatepass serve did not start")
            time.sleep(0.1)
        baseline = peak_kib(server.pid)
        cpu_before = cpu_seconds(server.pid)
        started = time.perf_counter()
        response = httpx.post(base + "/admin/api/v1/users/import", content=chunks(file),
                              headers={"Authorization": f"Bearer {key}",
                                       "Content-Type": "application/x-ndjson"}, timeout=600)
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(server.pid) - cpu_before
        body = response.json()
        if response.status_code != 200:
            raise SystemExit(f"the API import failed: {response.text[:300]}")
        summary = f"{body['created']} created, {body['updated']} updated, " \
                  f"{len(body['failed'])} failed (server VmHWM before: {baseline / 1024:.0f} MiB)"
        return elapsed, cpu, peak_kib(server.pid), summary
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--via", choices=("api", "cli", "both"), default="both")
    args = parser.parse_args()
    backends = ("sqlite", "postgres") if args.backend == "both" else (args.backend,)
    ways = ("api", "cli") if args.via == "both" else (args.via,)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        file = workdir / "users.jsonl"
        write_users(file, args.users)
        size = file.stat().st_size / 1024 / 1024
        print(f"{args.users:,} users, {size:.0f} MiB of JSON Lines", flush=True)
        for backend in backends:
            for way in ways:
                url = fresh_database(backend, workdir)
                env = env_for(url, workdir)
                run = via_api if way == "api" else via_cli
                elapsed, cpu, peak, summary = run(env, file)
                load = os.getloadavg()[0]
                print(f"{backend:8} {way:3}  {args.users / elapsed:8,.0f} users/s  "
                      f"{elapsed:6.1f} s  cpu {cpu:5.1f} s  peak {peak / 1024:5.0f} MiB  "
                      f"load {load:4.2f}  ({summary})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
