"""Mail that is never lost: outbox, worker, SMTP and .eml delivery, retries, scrubbing, CLI.

Everything is real: SQLite and PostgreSQL, aiosmtpd servers on localhost, `gatepass worker`
subprocesses killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from conftest import Mailbox, free_port, start_server, text_part
from sqlalchemy import func, select
from typer.testing import CliRunner

from gatepass.auth import service as auth
from gatepass.cli import app as cli_app
from gatepass.core import Core, build_core
from gatepass.db import utcnow
from gatepass.mail.service import queue_mail
from gatepass.outbox import kinds
from gatepass.outbox.kinds import Claimed, Outcome
from gatepass.outbox.models import OutboxAttempt, OutboxMessage
from gatepass.outbox.worker import backoff, deliver_pending
from gatepass.settings import Settings

GATEPASS = str(Path(sys.executable).parent / "gatepass")


# -- helpers ------------------------------------------------------------------------------------

def queue(core: Core, *recipients: str, sensitive: bool = False) -> list[str]:
    """Queue one 'password changed' mail per recipient in one transaction; their outbox ids."""
    with core.db.write() as session:
        messages = [queue_mail(session, core, "password_changed", to,
                               {"username": to.split("@")[0], "how": None,
                                "forgot_url": core.link("/password/forgot")},
                               sensitive=sensitive) for to in recipients]
        session.flush()
        return [message.id for message in messages]


def message(core: Core, message_id: str) -> OutboxMessage:
    with core.db.read() as session:
        row = session.get(OutboxMessage, message_id)
        assert row is not None
        return row


def attempts(core: Core, message_id: str) -> list[OutboxAttempt]:
    with core.db.read() as session:
        return list(session.execute(
            select(OutboxAttempt).where(OutboxAttempt.message_id == message_id)
            .order_by(OutboxAttempt.attempted_at)).scalars())


def outbox_ids(messages: list[EmailMessage]) -> list[str]:
    return [str(m["Message-ID"]).strip("<>").split("@")[0] for m in messages]


@dataclass
class PickyHandler:
    """An SMTP server that refuses some recipients (550 or 451) and may answer slowly."""

    box: Mailbox
    refuse: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    peers: set[Any] = field(default_factory=set)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.peers.add(session.peer)
        if self.delay:
            await asyncio.sleep(self.delay)
        parsed = message_from_bytes(envelope.content, policy=policy.default)
        with self.box.lock:
            self.box.messages.append(parsed)  # type: ignore[arg-type]
            self.box.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 OK queued"


def start_smtp(handler_factory: Callable[[Mailbox], Any], port: int | None = None
               ) -> tuple[Mailbox, Any, Controller]:
    box = Mailbox(host="127.0.0.1", port=port or free_port())
    handler = handler_factory(box)
    controller = Controller(handler, hostname=box.host, port=box.port)
    controller.start()
    return box, handler, controller


@pytest.fixture
def picky() -> Iterator[tuple[Mailbox, PickyHandler]]:
    box, handler, controller = start_smtp(PickyHandler)
    yield box, handler
    controller.stop()


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEPASS_")}
    env.update({
        "GATEPASS_DATABASE_URL": settings.database_url,
        "GATEPASS_SECRET_KEY": settings.secret_key or "",
        "GATEPASS_VAR_DIR": str(settings.var_dir),
        "GATEPASS_PUBLIC_URL": settings.public_url,
        "GATEPASS_OUTBOX_POLL_SECONDS": "0.1",
        "GATEPASS_LOG_LEVEL": "WARNING",
        **extra})
    if settings.smtp_url:
        env["GATEPASS_SMTP_URL"] = settings.smtp_url
    return env


@contextmanager
def running_workers(env: dict[str, str], count: int) -> Iterator[None]:
    """`count` `gatepass worker` processes, each up and polling (it logs
    outbox.worker_started at INFO) before the body runs; on leaving, SIGTERM, and each must
    exit cleanly."""
    workers = [subprocess.Popen([GATEPASS, "worker"], env={**env, "GATEPASS_LOG_LEVEL": "INFO"},
                                stderr=subprocess.PIPE, text=True) for _ in range(count)]
    try:
        for worker in workers:
            assert worker.stderr is not None
            while "outbox.worker_started" not in worker.stderr.readline():
                pass
        yield
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.communicate(timeout=20)
            assert worker.returncode == 0


def wait_until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


# -- delivery -----------------------------------------------------------------------------------

def test_a_queued_mail_arrives_from_the_configured_sender_with_both_parts(
        make_settings: Callable[..., Settings], smtp_server: Mailbox) -> None:
    """The SMTP server receives the message from exactly GATEPASS_MAIL_FROM, to the user,
    with the rendered subject, a text and an HTML part, a Date and a Message-ID."""
    core = build_core(make_settings(smtp_url=smtp_server.url,
                                    mail_from="Example Portal <support@portal.example>"))
    [message_id] = queue(core, "ada@example.com")

    deliver_pending(core)

    [mail] = smtp_server.wait_for(1)
    assert mail["From"] == "Example Portal <support@portal.example>"
    assert smtp_server.envelopes[0] == ("support@portal.example", ["ada@example.com"])
    assert mail["To"] == "ada@example.com"
    assert mail["Subject"] == "Your Gatepass password was changed"
    assert mail["Date"] and mail["Message-ID"] == f"<{message_id}@portal.example>"
    assert mail.get_content_type() == "multipart/alternative"
    assert "http://portal.example.test/password/forgot" in text_part(mail)
    html = mail.get_body(preferencelist=("html",))
    assert html is not None and "<html" in str(html.get_content())
    sent = message(core, message_id)
    assert sent.status == "sent" and sent.delivered_at is not None and sent.lease_owner is None
    [attempt] = attempts(core, message_id)
    assert attempt.outcome == "sent" and attempt.status_code == 250
    core.close()


def test_without_smtp_each_mail_is_written_as_a_parseable_eml_file(core: Core) -> None:
    """With no GATEPASS_SMTP_URL, every message lands whole in var/mail/ as an .eml file."""
    ids = queue(core, "ada@example.com", "bob@example.com")

    deliver_pending(core)

    folder = Path(core.settings.var_dir) / "mail"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{i}.eml" for i in ids)
    parsed = message_from_bytes((folder / f"{ids[0]}.eml").read_bytes(), policy=policy.default)
    assert parsed["From"] == core.settings.mail_from
    assert parsed["To"] == "ada@example.com"
    assert parsed["Subject"] == "Your Gatepass password was changed"
    assert "Hello ada," in text_part(parsed)  # type: ignore[arg-type]
    assert parsed.get_body(preferencelist=("html",)) is not None
    assert message(core, ids[1]).status == "sent"


def test_a_change_that_rolls_back_leaves_no_message(core: Core, smtp_server: Mailbox) -> None:
    """Mail queued inside a transaction that fails is never stored and never sent."""
    with pytest.raises(RuntimeError), core.db.write() as session:
        queue_mail(session, core, "password_changed", "ada@example.com",
                   {"username": "ada", "how": None, "forgot_url": "x"})
        session.flush()
        raise RuntimeError("the change failed")

    assert deliver_pending(core) == 0
    with core.db.read() as session:
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 0
    assert smtp_server.messages == []


# -- retries, dead messages, scrubbing ----------------------------------------------------------

def test_smtp_down_then_back_the_message_is_retried_and_delivered(
        make_settings: Callable[..., Settings]) -> None:
    """Connection refused is a temporary failure: the attempt is recorded, the message waits
    with backoff, and it is delivered once the server is back."""
    port = free_port()
    core = build_core(make_settings(smtp_url=f"smtp://127.0.0.1:{port}",
                                    outbox_retry_base_seconds=0.3))
    [message_id] = queue(core, "ada@example.com")

    deliver_pending(core)

    waiting = message(core, message_id)
    assert waiting.status == "pending" and waiting.attempts == 1
    assert waiting.next_attempt_at > utcnow()
    [refused] = attempts(core, message_id)
    assert refused.outcome == "retry" and refused.detail

    box, _, controller = start_smtp(lambda b: PickyHandler(b), port=port)
    try:
        time.sleep(0.5)
        deliver_pending(core)
        [mail] = box.wait_for(1)
    finally:
        controller.stop()
    assert mail["To"] == "ada@example.com"
    assert message(core, message_id).status == "sent"
    assert [a.outcome for a in attempts(core, message_id)] == ["retry", "sent"]
    core.close()


def test_backoff_starts_within_seconds_and_spreads_over_about_a_day() -> None:
    """The default schedule waits ~10 s first and gives up after about a day."""
    import random

    rng = random.Random(1)
    delays = [backoff(n, 10.0, rng) for n in range(1, 15)]  # 15 attempts = 14 waits

    assert 8 <= delays[0] <= 12
    assert all(d <= 6 * 3600 * 1.2 for d in delays)
    assert 18 * 3600 <= sum(delays) <= 30 * 3600


def test_a_recipient_refused_with_5xx_is_dead_at_once_and_logged_without_its_body(
        make_settings: Callable[..., Settings], picky: tuple[Mailbox, PickyHandler],
        caplog: pytest.LogCaptureFixture) -> None:
    """550 for the recipient: one attempt, status dead, a mail.failed log line and metric;
    its sensitive body is scrubbed; other mail still goes out; 451 means try again later."""
    box, handler = picky
    handler.refuse["gone@example.com"] = "550 5.1.1 No such user"
    handler.refuse["busy@example.com"] = "451 4.7.1 Try again later"
    core = build_core(make_settings(smtp_url=box.url))
    [dead_id] = queue(core, "gone@example.com", sensitive=True)
    [busy_id, ok_id] = queue(core, "busy@example.com", "ada@example.com")

    with caplog.at_level(logging.WARNING, logger="gatepass.outbox"):
        deliver_pending(core)

    dead = message(core, dead_id)
    assert dead.status == "dead" and dead.attempts == 1
    assert "550" in (dead.last_error or "")
    assert "text" not in dead.payload and "html" not in dead.payload
    assert dead.payload["to"] == "gone@example.com"
    [attempt] = attempts(core, dead_id)
    assert attempt.outcome == "dead" and attempt.status_code == 550
    busy = message(core, busy_id)
    assert busy.status == "pending" and busy.next_attempt_at > utcnow()
    assert attempts(core, busy_id)[0].status_code == 451
    assert message(core, ok_id).status == "sent" and len(box.messages) == 1
    [failed] = [r for r in caplog.records if r.getMessage() == "mail.failed"]
    assert failed.message_id == dead_id  # type: ignore[attr-defined]
    assert "password was changed" not in str(failed.__dict__)
    assert core.metrics.registry.get_sample_value(
        "gatepass_outbox_attempts_total", {"kind": "mail", "outcome": "dead"}) == 1
    core.close()


def test_a_message_that_keeps_failing_is_dead_after_the_last_attempt(
        make_settings: Callable[..., Settings]) -> None:
    """After GATEPASS_OUTBOX_MAX_ATTEMPTS temporary failures the message is dead."""
    core = build_core(make_settings(smtp_url=f"smtp://127.0.0.1:{free_port()}",
                                    outbox_max_attempts=2, outbox_retry_base_seconds=0.05))
    [message_id] = queue(core, "ada@example.com")

    deliver_pending(core)
    time.sleep(0.1)
    deliver_pending(core)

    assert message(core, message_id).status == "dead"
    assert [a.outcome for a in attempts(core, message_id)] == ["retry", "retry"]
    core.close()


def test_sensitive_bodies_are_scrubbed_once_sent_and_others_are_kept(
        core: Core) -> None:
    """A mail with a password or one-time link keeps only to/subject/template once sent."""
    [secret_id] = queue(core, "ada@example.com", sensitive=True)
    [plain_id] = queue(core, "bob@example.com")

    deliver_pending(core)

    secret = message(core, secret_id)
    assert secret.status == "sent"
    assert set(secret.payload) == {"template", "from", "to", "subject", "scrubbed"}
    assert "text" in message(core, plain_id).payload
    assert attempts(core, secret_id)[0].outcome == "sent"


# -- CLI --------------------------------------------------------------------------------------

def test_mail_retry_requeues_a_dead_message_and_refuses_others_clearly(
        make_settings: Callable[..., Settings], picky: tuple[Mailbox, PickyHandler]) -> None:
    """`gatepass mail retry ID` re-queues a dead message, which is then delivered; an unknown
    id, a sent one and a scrubbed one each get one clear sentence and exit status 1."""
    box, handler = picky
    handler.refuse["gone@example.com"] = "550 5.1.1 No such user"
    settings = make_settings(smtp_url=box.url)
    core = build_core(settings)
    [dead_id, sent_id] = queue(core, "gone@example.com", "ada@example.com")
    [scrubbed_id] = queue(core, "gone@example.com", sensitive=True)
    deliver_pending(core)
    env = worker_env(settings)
    runner = CliRunner()

    listed = runner.invoke(cli_app, ["mail", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert dead_id in listed.output and "dead" in listed.output and "ada@example.com" in listed.output

    del handler.refuse["gone@example.com"]
    result = runner.invoke(cli_app, ["mail", "retry", dead_id], env=env)
    assert result.exit_code == 0, result.output
    assert message(core, dead_id).status == "pending"
    deliver_pending(core)
    assert message(core, dead_id).status == "sent"
    assert [m["To"] for m in box.messages] == ["ada@example.com", "gone@example.com"]

    for bad, words in (("nope", "no message with id nope"), (sent_id, "already sent"),
                       (scrubbed_id, "cannot be re-sent")):
        result = runner.invoke(cli_app, ["mail", "retry", bad], env=env)
        assert result.exit_code == 1
        assert words in result.output
    core.close()


# -- workers as processes -----------------------------------------------------------------------

def test_a_worker_killed_mid_batch_loses_nothing(
        make_settings: Callable[..., Settings], picky: tuple[Mailbox, PickyHandler]) -> None:
    """SIGKILL a `gatepass worker` halfway: after its leases expire the next worker delivers
    every message; the few delivered twice are at most those in flight at the kill."""
    box, handler = picky
    handler.delay = 0.01
    settings = make_settings(smtp_url=box.url)
    core = build_core(settings)
    ids = queue(core, *(f"user{i}@example.com" for i in range(80)))
    env = worker_env(settings, GATEPASS_OUTBOX_LEASE_SECONDS="1", GATEPASS_OUTBOX_CONCURRENCY="8",
                     GATEPASS_SMTP_CONNECTIONS="2")

    first = subprocess.Popen([GATEPASS, "worker"], env=env, stderr=subprocess.DEVNULL)
    try:
        box.wait_for(20)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    at_kill = len(box.messages)
    assert at_kill < 80, "the first worker finished before it could be killed"
    second = subprocess.Popen([GATEPASS, "worker"], env=env, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: set(outbox_ids(box.messages)) >= set(ids))
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0

    duplicates = len(box.messages) - len(set(outbox_ids(box.messages)))
    assert duplicates <= 8
    with core.db.read() as session:
        statuses = session.execute(select(OutboxMessage.status, func.count())
                                   .group_by(OutboxMessage.status)).all()
    assert dict(statuses) == {"sent": 80}
    core.close()


def test_two_workers_on_postgresql_never_deliver_a_message_twice(
        backend: str, make_settings: Callable[..., Settings],
        picky: tuple[Mailbox, PickyHandler]) -> None:
    """Two running `gatepass worker` processes share one PostgreSQL outbox: both deliver,
    and each message arrives exactly once."""
    if backend != "postgres":
        pytest.skip("several worker processes are a PostgreSQL deployment")
    box, handler = picky
    handler.delay = 0.005
    settings = make_settings(smtp_url=box.url)
    core = build_core(settings)
    env = worker_env(settings, GATEPASS_SMTP_CONNECTIONS="2")
    with running_workers(env, 2):  # both are up and polling before anything is queued
        ids = queue(core, *(f"user{i}@example.com" for i in range(120)))
        box.wait_for(120, timeout=30)
        time.sleep(0.3)  # a duplicate would arrive now

    assert sorted(outbox_ids(box.messages)) == sorted(ids)
    assert len(handler.peers) > 2  # more connections than one worker opens: both delivered
    core.close()


def test_serve_delivers_inline_within_seconds(
        make_settings: Callable[..., Settings], smtp_server: Mailbox) -> None:
    """With GATEPASS_WORKER=inline the web process delivers: an admin creates a user with a
    generated password, the mail arrives promptly, and /metrics shows the outbox depth."""
    port = free_port()
    core = build_core(make_settings(worker="inline", smtp_url=smtp_server.url,
                                    public_url=f"http://127.0.0.1:{port}"))
    _, key = auth.create_api_key(core, "tests", ["admin"])
    server = start_server(core, port)
    try:
        started = time.monotonic()
        response = httpx.post(f"{server.url}/admin/api/v1/users",
                              headers={"Authorization": f"Bearer {key}"},
                              json={"email": "ada@example.com", "generate_password": True,
                                    "send_password": True})
        assert response.status_code == 201, response.text
        [mail] = smtp_server.wait_for(1, timeout=5)
        elapsed = time.monotonic() - started
        # The SMTP server has the message before the worker records it sent: give the worker
        # its moment to commit, then the depth must be back to zero.
        drained = 'gatepass_outbox_depth{kind="mail",status="pending"} 0.0'
        deadline = time.monotonic() + 5
        while drained not in (metrics := httpx.get(f"{server.url}/metrics").text):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        server.stop()
    assert elapsed < 2
    assert mail["To"] == "ada@example.com"
    assert response.json()["password"] in text_part(mail)
    assert f"http://127.0.0.1:{port}/signin" in text_part(mail)
    assert drained in metrics


# -- the deliverer contract (webhooks use it) ----------------------------------------------------

@dataclass
class OrderedDeliverer:
    """A deliverer for a test kind: slow for one target, asks once for an immediate retry."""

    log: list[tuple[str, int]] = field(default_factory=list)
    in_flight: dict[str, int] = field(default_factory=dict)
    most_in_flight: int = 0
    asked_retry: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def deliver(self, message: Claimed) -> Outcome:
        target = message.target or ""
        self.in_flight[target] = self.in_flight.get(target, 0) + 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight[target])
        try:
            await asyncio.sleep(0.15 if target == "slow" else 0.005)
            if target == "fast" and message.seq == 2 and not self.asked_retry:
                self.asked_retry = True
                return Outcome("retry", detail="503", status_code=503, retry_after=0)
            self.log.append((target, message.seq or 0))
            return Outcome("sent", status_code=200)
        finally:
            self.in_flight[target] -= 1

    async def close(self) -> None:
        return None


def test_targets_get_one_delivery_at_a_time_in_order_and_a_slow_one_delays_no_other(
        core: Core) -> None:
    """Rows with a target: at most one in flight per target, delivered in seq order (even
    across a retry with retry_after), while another target's rows flow past a slow one."""
    deliverer = OrderedDeliverer()
    kinds.register("ordered-test", lambda _core: deliverer)
    with core.db.write() as session:
        for target in ("slow", "fast"):
            for seq in (5, 1, 4, 2, 3):
                session.add(OutboxMessage(kind="ordered-test", payload={}, target=target,
                                          seq=seq))
    try:
        deliver_pending(core, timeout=20)
    finally:
        kinds.DELIVERERS.pop("ordered-test", None)

    assert [seq for target, seq in deliverer.log if target == "fast"] == [1, 2, 3, 4, 5]
    assert [seq for target, seq in deliverer.log if target == "slow"] == [1, 2, 3, 4, 5]
    assert deliverer.most_in_flight == 1
    fast_done = max(i for i, (target, _) in enumerate(deliverer.log) if target == "fast")
    slow_before = [t for t, _ in deliverer.log[:fast_done] if t == "slow"]
    assert len(slow_before) <= 2  # the fast target did not wait behind the slow one
    with core.db.read() as session:
        assert session.scalar(select(func.count()).select_from(OutboxMessage)
                              .where(OutboxMessage.status != "sent")) == 0
