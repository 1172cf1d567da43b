"""Forgot and reset password (CONTRACT §4), including users who share one email address.

`request_reset` changes nothing on any account: it only mails links. A username names exactly
one user; an email names everyone who has it, and each of them gets their own link naming
their own username (Power Pages refuses this case: "email address is duplicate").
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from gatepass.auth import service as auth
from gatepass.auth import tokens
from gatepass.context import Context
from gatepass.errors import InvalidToken
from gatepass.events import service as events
from gatepass.mail.service import queue_mail
from gatepass.registration.service import users_for_login
from gatepass.users import service as users
from gatepass.users.models import User

if TYPE_CHECKING:
    from gatepass.core import Core

MAX_LOGIN_LENGTH = 320


def request_reset(core: Core, ctx: Context, login: str) -> int:
    """Mail a reset link to each user `login` names; returns how many (never shown to callers)."""
    login = login.strip()
    if not login or len(login) > MAX_LOGIN_LENGTH:
        return 0
    minutes = core.site["tokens.reset_lifetime_minutes"]
    with core.db.write() as session:
        targets = [user for user in users_for_login(session, login)
                   if user.email and user.login_enabled]
        for user in targets:
            raw = tokens.issue(session, user, "reset", timedelta(minutes=minutes))
            queue_mail(session, core, "password_reset", user.email or "",
                       {"username": user.username, "first_name": user.first_name,
                        "link": core.link(f"/password/reset?token={raw}"),
                        "lifetime_minutes": minutes, "shared": len(targets) > 1},
                       sensitive=True)
            events.record(session, ctx, "user.password_reset_requested",
                          {"user": users.user_public(user)}, user_id=user.id)
        return len(targets)


def user_for_token(core: Core, raw: str) -> User | None:
    """Whose link this is, for the reset page; None when it is unknown, used or expired."""
    with core.db.read() as session:
        return tokens.peek(session, "reset", raw)


def reset_password(core: Core, ctx: Context, raw: str, new_password: str) -> User:
    """Use a reset link once: new password, every session signed out, lockout cleared.

    The user is not signed in; a "your password was changed" notice is mailed.
    """
    found = user_for_token(core, raw)
    if found is None:
        raise InvalidToken(field="token")
    auth.check_new_password(core, new_password, found.username, found.email)
    new_hash = core.hasher.hash(new_password)  # outside the transaction: hashing takes a while
    with core.db.write() as session:
        user, _ = tokens.consume(session, "reset", raw)
        # Receiving the link proves the user reads mail at this address.
        user.email_verified = True
        auth.set_password(core, session, ctx.but(actor_type="user", actor_id=user.id), user,
                          new_hash, keep_session_id=None, event="user.password_reset",
                          how="reset with a link sent by email")
        return user
