"""Sign-in benchmark (issue 2): argon2 verify time, the ceiling it implies, and what a real
`gatepass serve` (default options, SQLite) achieves.

    .venv/bin/python bench/signin.py [--seconds 10]      (or: make bench)

Figures go to stdout; record them in docs/performance.md under "Sign-in".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import argon2
import httpx

PASSWORD = "correct horse battery staple"
GATEPASS = str(Path(sys.executable).with_name("gatepass"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def argon2_verify_seconds(rounds: int = 30) -> float:
    """Median single-thread verify time at Gatepass's default parameters."""
    from gatepass.settings import Settings

    defaults = Settings()
    hasher = argon2.PasswordHasher(time_cost=defaults.argon2_time_cost,
                                   memory_cost=defaults.argon2_memory_kib,
                                   parallelism=defaults.argon2_parallelism, type=argon2.Type.ID)
    stored = hasher.hash(PASSWORD)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        hasher.verify(stored, PASSWORD)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


USERS = 64  # one user per client: concurrent sign-ins of one user count as in-flight attempts


def prepare(workdir: Path, count: int) -> None:
    """Migrate ./var/gatepass.db in workdir, create the users, turn off request rate limits
    (every client here shares one IP; we measure the sign-in path, not the limiter)."""
    from gatepass.context import CLI
    from gatepass.core import build_core
    from gatepass.migrate import upgrade
    from gatepass.settings import Settings
    from gatepass.users import service as users
    from gatepass.users.schemas import UserCreate

    core = build_core(Settings(database_url=f"sqlite:///{workdir}/var/gatepass.db",
                               var_dir=workdir / "var"))
    upgrade(core.db.engine)
    for number in range(count):
        users.create_user(core, CLI, UserCreate(username=f"bench{number}", password=PASSWORD,
                                                password_expired=False))
    with core.db.write() as session:
        core.site.update(session, {"ratelimit.enabled": False})
    core.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def load(url: str, clients: int, seconds: float, method: str, path: str,
               signin: bool = False, **request: object) -> tuple[int, list[float], int]:
    """`clients` concurrent loops for `seconds`: (ok count, latencies, errors)."""
    latencies: list[float] = []
    errors = 0
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        async def worker(number: int) -> None:
            nonlocal errors
            mine = dict(request)
            if signin:
                mine["json"] = {"login": f"bench{number % USERS}", "password": PASSWORD}
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await http.request(method, path, **mine)  # type: ignore[arg-type]
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        await asyncio.gather(*(worker(n) for n in range(clients)))
    if statuses:
        print(f"  (non-200 answers by status: {statuses})")
    return len(latencies), latencies, errors


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    verify = argon2_verify_seconds()
    ceiling = cores / verify
    print(f"machine: {cores} cores, {cpu_model()}, Python {platform.python_version()}")
    print(f"argon2id verify (m=19456 KiB, t=2, p=1), one core: {verify * 1000:.1f} ms")
    print(f"ceiling: {cores} cores / {verify * 1000:.1f} ms = {ceiling:.1f} sign-ins/s")

    with tempfile.TemporaryDirectory() as workdir:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEPASS_")}
        prepare(Path(workdir), USERS)
        port = free_port()
        server = subprocess.Popen([GATEPASS, "serve", "--port", str(port)], cwd=workdir,
                                  env={**env, "GATEPASS_LOG_LEVEL": "WARNING"},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    httpx.get(url + "/healthz")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            body = {"login": "bench0", "password": PASSWORD}
            asyncio.run(load(url, 4, 1.0, "POST", "/api/v1/auth/signin", signin=True))
            for clients, target in ((4, 0.95), (64, 0.90)):
                count, latencies, errors = asyncio.run(
                    load(url, clients, args.seconds, "POST", "/api/v1/auth/signin", signin=True))
                rate = count / args.seconds
                print(f"sign-in, {clients:>2} clients: {rate:6.1f}/s = {rate / ceiling:.2f} of "
                      f"ceiling (target {target}), p50 {pct(latencies, 0.5):.0f} ms, "
                      f"p99 {pct(latencies, 0.99):.0f} ms, errors {errors}")
            token = httpx.post(url + "/api/v1/auth/signin", json=body).json()["session_token"]
            headers = {"Authorization": f"Bearer {token}"}
            count, latencies, errors = asyncio.run(
                load(url, 16, args.seconds, "GET", "/api/v1/me", headers=headers))
            print(f"GET /api/v1/me, 16 clients, one server process: {count / args.seconds:.0f} "
                  f"req/s, p50 {pct(latencies, 0.5):.1f} ms, p99 {pct(latencies, 0.99):.1f} ms, "
                  f"errors {errors}")
        finally:
            server.terminate()
            server.wait(timeout=15)


if __name__ == "__main__":
    main()
