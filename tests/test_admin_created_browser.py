"""Seed 000 through a real browser: an admin creates the account, the user reads the mail from
a real SMTP server, signs in, is held on /password/change until they choose their own password.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from gatepass.auth import service as auth
from gatepass.db import Base
from gatepass.outbox.models import OutboxMessage

from conftest import LiveServer, Mailbox, text_part

pytestmark = pytest.mark.browser


@pytest.fixture
def api(mailing_server: LiveServer) -> Iterator[httpx.Client]:
    _, raw = auth.create_api_key(mailing_server.core, "tests", ["admin"])
    with httpx.Client(base_url=mailing_server.url + "/admin/api/v1",
                      headers={"Authorization": f"Bearer {raw}"}, timeout=30) as client:
        yield client


def sign_in(page: Any, url: str, login: str, password: str) -> None:
    page.goto(url + "/signin")
    page.fill("#login", login)
    page.fill("#password", password)
    page.click("button:has-text('Sign in')")


def settled(server: LiveServer, timeout: float = 15.0) -> None:
    """Wait until the worker has finished with every queued message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with server.core.db.read() as session:
            if not session.scalars(sa.select(OutboxMessage.id)
                                   .where(OutboxMessage.status == "pending")).first():
                return
        time.sleep(0.05)
    raise AssertionError("the outbox did not drain")


def database_text(server: LiveServer) -> str:
    with server.core.db.read() as session:
        return "\n".join(json.dumps(list(row), default=str)
                         for table in Base.metadata.sorted_tables
                         for row in session.execute(sa.select(table)).all())


def test_a_generated_password_must_be_changed_at_first_sign_in(
        page: Any, api: httpx.Client, mailing_server: LiveServer, smtp_server: Mailbox) -> None:
    """The whole seed-000 story, and the mailed password is left nowhere once delivered."""
    url = mailing_server.url
    created = api.post("/users", json={"email": "ada@example.com", "first_name": "Ada",
                                       "generate_password": True, "send_password": True,
                                       "password_expired": True}).json()
    password = created["password"]

    mail = smtp_server.wait_for(1)[0]
    body = text_part(mail)
    assert mail["To"] == "ada@example.com"
    assert "Username: ada" in body and f"Temporary password: {password}" in body
    assert f"Sign in at {url}/signin" in body

    sign_in(page, url, "ada", password)
    page.wait_for_url(url + "/password/change")
    assert page.is_visible("#forced-reason")
    page.goto(url + "/profile")
    assert page.url == url + "/password/change"  # no way around it through the pages

    page.fill("#current_password", password)
    page.fill("#new_password", "Ada's own analytical engine")
    page.fill("#confirm_password", "Ada's own analytical engine")
    page.click("button:has-text('Change password')")
    page.wait_for_url(url + "/profile?notice=changed")
    assert page.inner_text("#username") == "ada"

    page.context.clear_cookies()
    sign_in(page, url, "ada", "Ada's own analytical engine")
    page.wait_for_url(url + "/profile")
    page.context.clear_cookies()
    sign_in(page, url, "ada", password)
    assert page.inner_text("#form-error") == "The username or password is incorrect."

    smtp_server.wait_for(2)
    assert smtp_server.to("ada@example.com")[-1]["Subject"]  # "your password was changed"
    settled(mailing_server)
    assert password not in database_text(mailing_server)


def test_a_set_password_link_works_once_in_the_browser(
        page: Any, api: httpx.Client, mailing_server: LiveServer, smtp_server: Mailbox) -> None:
    """The mailed link names the user, refuses a mismatch, sets the password, then is spent."""
    url = mailing_server.url
    api.post("/users", json={"email": "grace@example.com", "send_password": True})
    found = re.search(r"http\S+/password/set\?token=[\w-]+", text_part(smtp_server.wait_for(1)[0]))
    assert found is not None
    link = found.group(0)
    assert link.startswith(url + "/password/set?token=")

    page.goto(link)
    assert page.inner_text("#set-username") == "grace"
    page.fill("#new_password", "nanoseconds of wire")
    page.fill("#confirm_password", "nanoseconds of wirE")
    page.click("button:has-text('Set password')")
    assert page.inner_text("#form-error") == "The two passwords do not match."
    page.fill("#new_password", "nanoseconds of wire")
    page.fill("#confirm_password", "nanoseconds of wire")
    page.click("button:has-text('Set password')")
    page.wait_for_url(url + "/signin?notice=set")
    assert "Your password is set" in page.inner_text("[role=status]")

    sign_in(page, url, "grace", "nanoseconds of wire")
    page.wait_for_url(url + "/profile")
    page.goto(link)
    assert "invalid or has expired" in page.inner_text("#form-error")
    assert page.locator("#new_password").count() == 0
    settled(mailing_server)
    assert link.split("token=")[1] not in database_text(mailing_server)
