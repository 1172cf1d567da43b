"""Registration and password recovery through a real browser, with mail read from a real SMTP
server (issue 5)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from conftest import LiveServer, Mailbox, set_site, text_part
from gatepass.context import CLI
from gatepass.users import service as users
from gatepass.users.schemas import UserCreate

pytestmark = pytest.mark.browser

PASSWORD = "my own long passphrase"


def link_in(message: Any, path: str) -> str:
    match = re.search(r"https?://\S+" + re.escape(path) + r"\?token=[\w-]+", text_part(message))
    assert match, text_part(message)
    return match.group(0)


def sign_in(page: Any, url: str, login: str, password: str) -> None:
    page.goto(url + "/signin")
    page.fill("#login", login)
    page.fill("#password", password)
    page.click("button:has-text('Sign in')")


def test_register_verify_and_sign_in(page: Any, mailing_server: LiveServer,
                                     smtp_server: Mailbox) -> None:
    """A visitor follows "Create an account", registers, confirms the mailed link and signs in."""
    url = mailing_server.url
    set_site(mailing_server.core, registration__require_email_verification=True)

    page.goto(url + "/signin")
    page.click("text=Create an account")
    page.fill("#email", "grace@example.com")
    page.fill("#first_name", "Grace")
    page.fill("#password", PASSWORD)
    page.fill("#confirm_password", PASSWORD)
    page.click("button:has-text('Create account')")
    page.wait_for_selector("text=Check your email")
    [message] = smtp_server.wait_for(1)
    link = link_in(message, "/email/verify")
    sign_in(page, url, "grace", PASSWORD)
    refused = page.text_content("#form-error") or ""
    page.goto(link)
    page.click("button:has-text('Confirm my email address')")
    page.wait_for_url(re.compile(r"/signin"))
    confirmed = page.text_content("[role=status]") or ""
    sign_in(page, url, "grace", PASSWORD)
    page.wait_for_url(re.compile(r"/profile"))

    assert message["To"] == "grace@example.com"
    assert link.startswith(url + "/email/verify?token=")
    assert "Verify your email address" in refused
    assert "confirmed" in confirmed
    assert page.text_content("#username") == "grace"


def test_forgot_read_the_mail_choose_a_new_password_sign_in(page: Any,
                                                           mailing_server: LiveServer,
                                                           smtp_server: Mailbox) -> None:
    """A user who forgot their password gets a link by mail, chooses a new password (confirmed
    twice) and signs in with it; the old one no longer works."""
    url = mailing_server.url
    users.create_user(mailing_server.core, CLI, UserCreate(
        username="reeta", email="reeta@example.com", password="the old passphrase",
        password_expired=False))

    page.goto(url + "/signin")
    page.click("text=Forgot your password?")
    page.fill("#login", "reeta")
    page.click("button:has-text('Send reset link')")
    page.wait_for_selector("text=Check your email")
    [message] = smtp_server.wait_for(1)
    link = link_in(message, "/password/reset")
    page.goto(link)
    shown_user = page.text_content("#reset-username")
    page.fill("#new_password", PASSWORD)
    page.fill("#confirm_password", PASSWORD + "typo")
    page.click("button:has-text('Set new password')")
    mismatch = page.text_content("#form-error") or ""
    page.fill("#new_password", PASSWORD)
    page.fill("#confirm_password", PASSWORD)
    page.click("button:has-text('Set new password')")
    page.wait_for_url(re.compile(r"/signin"))
    notice = page.text_content("[role=status]") or ""
    sign_in(page, url, "reeta", "the old passphrase")
    old_refused = page.text_content("#form-error") or ""
    sign_in(page, url, "reeta", PASSWORD)
    page.wait_for_url(re.compile(r"/profile"))
    page.goto(link)
    reused = page.text_content("main") or ""

    assert link.startswith(url + "/password/reset?token=")
    assert "reeta" in str(message["Subject"])
    assert shown_user == "reeta"
    assert "do not match" in mismatch
    assert "reset" in notice
    assert "incorrect" in old_refused
    assert "invalid" in reused
    changed = smtp_server.wait_for(2)[1]
    assert "changed" in str(changed["Subject"])
