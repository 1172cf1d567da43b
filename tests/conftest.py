"""Real parts only: SQLite and PostgreSQL, a real HTTP server, a real SMTP server, a real browser.

Databases: every test that takes `core` runs once on SQLite and once on PostgreSQL. PostgreSQL
comes from GATEPASS_TEST_POSTGRES_URL (scripts/test sets it); without CI a missing server
skips those runs with a reason, under CI=true it fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from fastapi.testclient import TestClient

from gatepass.app import create_app
from gatepass.auth import service as auth
from gatepass.core import Core, build_core
from gatepass.db import Base, make_engine
from gatepass.migrate import upgrade
from gatepass.settings import Settings

CI = os.environ.get("CI") == "true"
PG_URL = os.environ.get("GATEPASS_TEST_POSTGRES_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("GATEPASS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# A cheap argon2 profile, for tests only; production defaults are m=19 MiB, t=2.
CHEAP_HASH = {"argon2_memory_kib": 64, "argon2_time_cost": 1}


def missing(what: str, how: str) -> None:
    """Skip with a reason that says how to run it; under CI, fail instead."""
    if CI:
        pytest.fail(f"{what} is required under CI=true but is not available: {how}")
    pytest.skip(f"{what} is not available ({how})")


# -- databases ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of our own on the test server, migrated once per session."""
    admin_url = sa.engine.make_url(PG_URL)
    name = f"gatepass_test_{os.getpid()}"
    try:
        admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        missing("PostgreSQL", f"set GATEPASS_TEST_POSTGRES_URL or start a server at {PG_URL}: "
                f"{str(exc).splitlines()[0]}")
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    yield url
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def _truncate(url: str) -> None:
    engine = sa.create_engine(url)
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as connection:
        connection.exec_driver_sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "gatepass.db"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("postgres_url")
    _truncate(url)
    return url


@pytest.fixture
def make_settings(database_url: str, tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url, "var_dir": tmp_path / "var",
            "secret_key": "test-secret-key-" + "x" * 32, "worker": "external",
            "public_url": "http://portal.example.test", **CHEAP_HASH,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def core(settings: Settings) -> Iterator[Core]:
    core = build_core(settings)
    yield core
    core.close()


@pytest.fixture
def client(core: Core) -> Iterator[TestClient]:
    with TestClient(create_app(core.settings, core=core), base_url="http://testserver") as c:
        yield c


@pytest.fixture
def admin_key(core: Core) -> str:
    _, raw = auth.create_api_key(core, "tests", ["admin"])
    return raw


@pytest.fixture
def admin(client: TestClient, admin_key: str) -> TestClient:
    """The test client, authorised with an admin API key for /admin/api/v1."""
    client.headers["Authorization"] = f"Bearer {admin_key}"
    return client


def set_site(core: Core, **values: Any) -> None:
    """Change site settings as an admin would (`a__b` stands for `a.b`)."""
    with core.db.write() as session:
        core.site.update(session, {key.replace("__", "."): value for key, value in values.items()})


# -- a real HTTP server -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    core: Core
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_server(core: Core, port: int) -> LiveServer:
    app = create_app(core.settings, core=core)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                            lifespan="on", limit_concurrency=1000, backlog=2048,
                            proxy_headers=False)  # as `gatepass serve` runs it
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return LiveServer(url=f"http://127.0.0.1:{port}", core=core, server=server, thread=thread)


@pytest.fixture
def live_server(make_settings: Callable[..., Settings]) -> Iterator[LiveServer]:
    """Gatepass under uvicorn on a free port; its public URL is that address."""
    port = free_port()
    core = build_core(make_settings(public_url=f"http://127.0.0.1:{port}"))
    server = start_server(core, port)
    yield server
    server.stop()


@pytest.fixture
def mailing_server(make_settings: Callable[..., Settings],
                   smtp_server: Mailbox) -> Iterator[LiveServer]:
    """Gatepass under uvicorn, delivering mail inline (GATEPASS_WORKER=inline) to the test
    SMTP server."""
    port = free_port()
    core = build_core(make_settings(public_url=f"http://127.0.0.1:{port}",
                                    smtp_url=smtp_server.url, worker="inline"))
    server = start_server(core, port)
    yield server
    server.stop()


@pytest.fixture
def live_admin(live_server: LiveServer) -> Iterator[httpx.Client]:
    _, raw = auth.create_api_key(live_server.core, "tests", ["admin"])
    with httpx.Client(base_url=live_server.url + "/admin/api/v1",
                      headers={"Authorization": f"Bearer {raw}"}, timeout=30) as client:
        yield client


# -- a real SMTP server -------------------------------------------------------------------------

@dataclass
class Mailbox:
    host: str
    port: int
    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    def wait_for(self, count: int = 1, timeout: float = 15.0) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.02)
        raise AssertionError(f"expected {count} mail(s), got {len(self.messages)}")

    def to(self, address: str) -> list[EmailMessage]:
        with self.lock:
            return [m for m in self.messages if address in str(m["To"])]


class _Handler:
    def __init__(self, box: Mailbox) -> None:
        self.box = box

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.content, policy=policy.default)
        with self.box.lock:
            self.box.messages.append(message)  # type: ignore[arg-type]
            self.box.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 OK"


@pytest.fixture
def smtp_server() -> Iterator[Mailbox]:
    """aiosmtpd on a free localhost port, collecting every message it receives."""
    from aiosmtpd.controller import Controller

    box = Mailbox(host="127.0.0.1", port=free_port())
    controller = Controller(_Handler(box), hostname=box.host, port=box.port)
    controller.start()
    yield box
    controller.stop()


def text_part(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


# -- a real browser -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's chromium driven by Playwright (never `playwright install`)."""
    if not Path(CHROMIUM).exists():
        missing("Chromium", "apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(15000)
    yield page
    context.close()
