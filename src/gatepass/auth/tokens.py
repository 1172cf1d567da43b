"""Secrets handed to people (session tokens, one-time links, API keys): random, hashed at rest."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from gatepass.auth.models import OneTimeToken
from gatepass.db import utcnow
from gatepass.errors import InvalidToken
from gatepass.users.models import User

PURPOSES = ("reset", "set_password", "verify_email")


def new_secret() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def keyed_digest(key: str, value: str) -> str:
    return hmac.new(key.encode(), value.encode(), hashlib.sha256).hexdigest()


def issue(session: Session, user: User, purpose: str, lifetime: timedelta,
          data: dict[str, str] | None = None) -> str:
    """A one-time token bound to the user's current security stamp; returns the raw token."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown token purpose {purpose!r}")
    raw = new_secret()
    session.add(OneTimeToken(purpose=purpose, token_hash=digest(raw), user_id=user.id,
                             security_stamp=user.security_stamp,
                             expires_at=utcnow() + lifetime, data=data or {}))
    return raw


def consume(session: Session, purpose: str, raw: str) -> tuple[User, OneTimeToken]:
    """Use a token once. Unknown, used, expired and stale tokens all raise the same error."""
    if not raw or len(raw) > 200:
        raise InvalidToken(field="token")
    now = utcnow()
    token = session.scalar(select(OneTimeToken).where(OneTimeToken.token_hash == digest(raw),
                                                      OneTimeToken.purpose == purpose))
    if token is None or token.used_at is not None or token.expires_at <= now:
        raise InvalidToken(field="token")
    user = session.get(User, token.user_id)
    if user is None or user.security_stamp != token.security_stamp:
        raise InvalidToken(field="token")
    # Conditional: of two requests racing with one token, exactly one wins.
    claimed = session.execute(
        update(OneTimeToken).where(OneTimeToken.id == token.id, OneTimeToken.used_at.is_(None))
        .values(used_at=now))
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        raise InvalidToken(field="token")
    return user, token


def peek(session: Session, purpose: str, raw: str) -> User | None:
    """The user a still-valid token belongs to, without using it (to show a username on a page)."""
    if not raw or len(raw) > 200:
        return None
    token = session.scalar(select(OneTimeToken).where(OneTimeToken.token_hash == digest(raw),
                                                      OneTimeToken.purpose == purpose))
    if token is None or token.used_at is not None or token.expires_at <= utcnow():
        return None
    user = session.get(User, token.user_id)
    if user is None or user.security_stamp != token.security_stamp:
        return None
    return user
