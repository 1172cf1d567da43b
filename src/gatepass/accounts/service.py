"""Set-password links: the user an admin created chooses their own first password.

Same rules as a reset link: the token works once, expires after
`tokens.set_password_lifetime_hours`, and dies when the password changes by any route or an
admin resets it (the security stamp rotates). Using it does not sign in; it ends every session
and clears a lockout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from gatepass.auth import service as auth
from gatepass.auth import tokens
from gatepass.context import Context
from gatepass.errors import InvalidToken, NotFound
from gatepass.users import service as users
from gatepass.users.models import User

if TYPE_CHECKING:
    from gatepass.core import Core

PURPOSE = "set_password"


def username_for_link(core: Core, raw: str) -> str | None:
    """The username a still-valid set-password link is for (shown on the page), or None."""
    with core.db.read() as session:
        user = tokens.peek(session, PURPOSE, raw)
        return user.username if user is not None else None


def set_password_with_token(core: Core, ctx: Context, raw: str, new_password: str) -> User:
    """Store the password chosen through a set-password link; returns the user."""
    with core.db.read() as session:
        user = tokens.peek(session, PURPOSE, raw)
        if user is None:
            raise InvalidToken(field="token")
        username, email = user.username, user.email
    # Checked and hashed before the write, so a weak password leaves the link usable.
    auth.check_new_password(core, new_password, username, email)
    new_hash = core.hasher.hash(new_password)
    with core.db.write() as session:
        user, _token = tokens.consume(session, PURPOSE, raw)
        user.email_verified = True  # the link was mailed there: the user reads that mailbox
        auth.set_password(core, session, ctx.but(actor_type="user", actor_id=user.id), user,
                          new_hash, keep_session_id=None, event="user.password_changed",
                          how="set through the link we sent you")
        return user


def find_user(session: Session, id_or_username: str) -> User:
    """A user by id, or else by username (case-insensitive): for the command line."""
    user = session.get(User, id_or_username) or users.find_by_username(session, id_or_username)
    if user is None:
        raise NotFound(f"There is no user with the id or username '{id_or_username}'.")
    return user


def user_id_of(core: Core, id_or_username: str) -> str:
    with core.db.read() as session:
        return find_user(session, id_or_username).id
