"""Invitations through a real browser, with the invitation read from a real SMTP server."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import LiveServer, Mailbox, text_part
from gatepass.auth import service as auth
from gatepass.users.models import User

pytestmark = pytest.mark.browser

PASSWORD = "my own long passphrase"


@pytest.fixture
def api(mailing_server: LiveServer) -> Iterator[httpx.Client]:
    _, raw = auth.create_api_key(mailing_server.core, "tests", ["admin"])
    with httpx.Client(base_url=mailing_server.url + "/admin/api/v1", timeout=30,
                      headers={"Authorization": f"Bearer {raw}"}) as client:
        yield client


def test_the_mailed_link_registers_the_invitee_with_account_and_roles(
        page: Any, mailing_server: LiveServer, api: httpx.Client, smtp_server: Mailbox) -> None:
    """The invitation mail's link opens /register with the code filled in; the new user has
    the invitation's account and roles."""
    account = api.post("/accounts", json={"name": "Contoso"}).json()["account"]
    api.post("/roles", json={"name": "partner"})
    api.post("/invitations", json={"type": "single", "emails": ["ada@example.com"],
                                   "account_id": account["id"], "roles": ["partner"]})
    [mail] = smtp_server.wait_for(1)
    link = re.search(r"http://\S+/register\?invitation=[\w-]+", text_part(mail))
    assert link, text_part(mail)

    page.goto(link.group(0))
    code = link.group(0).rsplit("=", 1)[1]
    assert page.input_value("#invitation_code") == code
    page.fill("#email", "ada@example.com")
    page.fill("#password", PASSWORD)
    page.fill("#confirm_password", PASSWORD)
    page.click("button:has-text('Create account')")
    page.wait_for_url(re.compile(r"/signin"))

    with mailing_server.core.db.read() as session:
        [user] = session.query(User).all()
        assert user.account_id == account["id"]
        assert [role.name for role in user.roles] == ["partner"]


def test_the_power_pages_link_form_prefills_the_code(
        page: Any, mailing_server: LiveServer, api: httpx.Client) -> None:
    """`/register/?returnurl=%2f&invitation=CODE`, as Power Pages mails it, works too."""
    code = api.post("/invitations", json={"type": "group", "send_email": False}).json()[
        "invitations"][0]["code"]

    page.goto(f"{mailing_server.url}/register/?returnurl=%2f&invitation={code}")

    assert page.input_value("#invitation_code") == code


def test_an_existing_account_redeems_after_signing_in(
        page: Any, mailing_server: LiveServer, api: httpx.Client) -> None:
    """Signed out, the redeem page sends you to sign in and back, with the code kept."""
    api.post("/roles", json={"name": "beta"})
    api.post("/users", json={"username": "grace", "password": PASSWORD,
                             "password_expired": False})
    code = api.post("/invitations", json={"type": "group", "roles": ["beta"],
                                          "send_email": False}).json()["invitations"][0]["code"]

    page.goto(f"{mailing_server.url}/invitations/redeem?invitation={code}")
    page.wait_for_url(re.compile(r"/signin"))
    page.fill("#login", "grace")
    page.fill("#password", PASSWORD)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(re.compile(r"/invitations/redeem"))
    assert page.input_value("#code") == code
    page.click("button:has-text('Redeem invitation')")

    assert "Invitation accepted" in page.text_content("[role=status]")
    page.goto(f"{mailing_server.url}/invitations/redeem")
    page.fill("#code", code)
    page.click("button:has-text('Redeem invitation')")
    assert "not valid" in page.text_content("[role=alert]")
    page.goto(f"{mailing_server.url}/profile")
    assert page.text_content("#roles") == "beta"
