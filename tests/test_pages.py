"""The sign-in pages in a real browser (Chromium) against a real server (CONTRACT §6)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gatepass.context import CLI
from gatepass.core import Core
from gatepass.users import service as users
from gatepass.users.models import User
from gatepass.users.schemas import UserCreate

from conftest import LiveServer, set_site

PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "a brand new passphrase"


@pytest.fixture
def backend() -> str:
    """Pages add nothing database-specific: the API tests cover both backends."""
    return "sqlite"


def make_user(core: Core, *, expired: bool = False) -> str:
    created = users.create_user(core, CLI, UserCreate(
        username="reeta", email="reeta@example.com", first_name="Reeta", password=PASSWORD,
        password_expired=expired))
    return created.user.id


def sign_in(page: Any, url: str, password: str = PASSWORD) -> None:
    page.goto(url + "/signin")
    page.get_by_label("Username or email").fill("reeta")
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


def test_sign_in_change_password_and_sign_out(live_server: LiveServer, page: Any) -> None:
    """A user signs in, sees the profile, changes the password and signs out."""
    make_user(live_server.core)

    sign_in(page, live_server.url)
    page.wait_for_url("**/profile")
    assert "reeta@example.com" in page.content()

    page.goto(live_server.url + "/password/change")
    page.get_by_label("Current password").fill(PASSWORD)
    page.get_by_label("New password", exact=True).fill(NEW_PASSWORD)
    page.get_by_label("Repeat the new password").fill(NEW_PASSWORD)
    page.get_by_role("button", name="Change password").click()
    page.wait_for_url("**/profile?notice=changed")
    assert "Your password was changed." in page.content()

    page.get_by_role("button", name="Sign out").first.click()
    page.wait_for_url("**/signin?notice=signed_out")
    assert "You are signed out." in page.content()
    page.goto(live_server.url + "/profile")
    assert "/signin" in page.url
    sign_in(page, live_server.url, NEW_PASSWORD)
    page.wait_for_url("**/profile")


def test_wrong_password_shows_a_clear_message(live_server: LiveServer, page: Any) -> None:
    """A wrong password keeps the user on the sign-in page with one clear message."""
    make_user(live_server.core)

    sign_in(page, live_server.url, "not my password")

    assert page.locator("#form-error").inner_text() == "The username or password is incorrect."
    assert page.get_by_label("Username or email").input_value() == "reeta"
    assert page.get_by_label("Password").input_value() == ""


def test_forced_change_lands_on_the_change_page(live_server: LiveServer, page: Any) -> None:
    """With an expired password the user lands on /password/change with the reason, and
    /profile sends them back there until the password is changed."""
    make_user(live_server.core, expired=True)

    sign_in(page, live_server.url)
    page.wait_for_url("**/password/change")
    assert "temporary or has expired" in page.locator("#forced-reason").inner_text()
    page.goto(live_server.url + "/profile")
    assert page.url.endswith("/password/change")

    page.get_by_label("Current password").fill(PASSWORD)
    page.get_by_label("New password", exact=True).fill(NEW_PASSWORD)
    page.get_by_label("Repeat the new password").fill("a different passphrase")
    page.get_by_role("button", name="Change password").click()
    assert page.locator("#form-error").inner_text() == "The new passwords do not match."

    page.get_by_label("Current password").fill(PASSWORD)
    page.get_by_label("New password", exact=True).fill(NEW_PASSWORD)
    page.get_by_label("Repeat the new password").fill(NEW_PASSWORD)
    page.get_by_role("button", name="Change password").click()
    page.wait_for_url("**/profile?notice=changed")
    page.goto(live_server.url + "/profile")
    assert page.url.endswith("/profile")


def test_a_form_post_without_the_csrf_token_is_refused(live_server: LiveServer,
                                                       page: Any) -> None:
    """A POST without the CSRF token (as a cross-site form would send) changes nothing."""
    user_id = make_user(live_server.core)
    sign_in(page, live_server.url)
    page.wait_for_url("**/profile")
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}

    with httpx.Client(base_url=live_server.url, cookies=cookies) as forger:
        profile = forger.post("/profile", data={"first_name": "Mallory"})
        change = forger.post("/password/change", data={
            "current_password": PASSWORD, "new_password": NEW_PASSWORD,
            "confirm_password": NEW_PASSWORD, "csrf_token": "forged"})
        signout = forger.post("/signout", data={})

    assert profile.status_code == 422  # no token at all: the form is incomplete
    assert change.status_code == 403
    assert "Reload the page and try again" in change.text
    assert signout.status_code == 422
    with live_server.core.db.read() as session:
        user = session.get(User, user_id)
        assert user is not None and user.first_name == "Reeta"
    page.goto(live_server.url + "/profile")
    assert page.url.endswith("/profile")  # still signed in
    sign_in_again = httpx.post(live_server.url + "/api/v1/auth/signin",
                               json={"login": "reeta", "password": PASSWORD})
    assert sign_in_again.status_code == 200  # the password did not change


def test_password_forms_state_the_configured_minimum_length(live_server: LiveServer,
                                                            page: Any) -> None:
    """The hint and the browser's own check follow password.min_length, not a fixed 8."""
    set_site(live_server.core, password__min_length=12, registration__open=True)
    make_user(live_server.core, expired=True)

    page.goto(live_server.url + "/register")
    assert page.get_by_label("Password", exact=True).get_attribute("minlength") == "12"
    assert "At least 12 characters" in page.locator("#password-hint").inner_text()
    sign_in(page, live_server.url)  # the expired password lands on the change page
    page.wait_for_url("**/password/change**")
    assert page.get_by_label("New password", exact=True).get_attribute("minlength") == "12"
    assert "At least 12 characters" in page.locator("#new-password-hint").inner_text()
