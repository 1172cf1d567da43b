"""Sign-in, sessions, lockout, password change and admin API keys."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from sqlalchemy import (Select, String, Table, Text, bindparam, case, delete, func, insert,
                        literal, select, union_all, update)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from gatepass.auth import tokens
from gatepass.auth.models import ApiKey, LoginFailure, UserSession
from gatepass.context import Context
from gatepass.db import Database, UTCDateTime, new_id, utcnow
from gatepass.errors import (EmailNotVerified, InvalidCredentials, InvalidInput, Locked,
                             LoginDisabled)
from gatepass.events import service as events
from gatepass.mail.service import queue_mail
from gatepass.passwords import policy
from gatepass.users.models import ExternalIdentity, Role, User, user_roles
from gatepass.users.service import casefold, public_view, rotate_credentials, user_public

if TYPE_CHECKING:
    from gatepass.core import Core

SCOPES = ("admin", "users", "invitations", "webhooks", "settings", "read")
MAX_LOGIN_LENGTH = 320
MAX_PASSWORD_INPUT = policy.MAX_LENGTH


@dataclass
class SignedIn:
    user_id: str
    user: dict[str, Any]  # the CONTRACT's user object
    token: str
    session_id: str
    password_change_required: bool


def password_change_required(core: Core, user: Any) -> bool:
    """Expired by an admin, by the generator, or by age (password.max_age_days)."""
    if user.password_expired:
        return True
    max_age = core.site["password.max_age_days"]
    return bool(max_age and user.password_changed_at is not None
                and user.password_changed_at < utcnow() - timedelta(days=max_age))


# -- lockout ------------------------------------------------------------------------------------
#
# An attempt is *reserved* with one conditional UPDATE before the password is checked, so
# however many requests race, at most `max_failed_attempts` of them ever get to verify a
# password before the lock: the reservation that reaches the maximum sets the lock at once,
# and a correct password lifts it again.

USERS: Table = User.__table__  # type: ignore[assignment]
FAILURES: Table = LoginFailure.__table__  # type: ignore[assignment]
SESSIONS: Table = UserSession.__table__  # type: ignore[assignment]


def _reservation(table: Table, key: Any) -> Any:
    """The conditional UPDATE that reserves an attempt for the row whose `key` is :key."""
    columns, now = table.c, bindparam("now", type_=UTCDateTime())
    lock_over = columns.locked_until.is_not(None) & (columns.locked_until <= now)
    new_count = case((lock_over, 1), else_=columns.failed_count + 1)
    return (update(table)
            .where(key == bindparam("key"))
            .where((columns.locked_until.is_(None) & (columns.failed_count < bindparam("maximum")))
                   | lock_over)
            .values(failed_count=new_count, updated_at=now,
                    locked_until=case((new_count >= bindparam("maximum"),
                                       bindparam("lock_until", type_=UTCDateTime())),
                                      else_=None)))


RESERVE = {USERS: _reservation(USERS, USERS.c.id),
           FAILURES: _reservation(FAILURES, FAILURES.c.login_hash)}
LOCKED_UNTIL = {USERS: select(USERS.c.locked_until).where(USERS.c.id == bindparam("key")),
                FAILURES: select(FAILURES.c.locked_until)
                .where(FAILURES.c.login_hash == bindparam("key"))}


def _reserve_attempt(db: Database, connection: Any, table: Table, key: str, maximum: int,
                     duration: timedelta) -> bool:
    now = utcnow()
    return db.prepared(RESERVE[table]).execute(connection, key=key, now=now, maximum=maximum,
                                               lock_until=now + duration) > 0


def _locked_until(db: Database, connection: Any, table: Table, key: str) -> datetime:
    found = db.prepared(LOCKED_UNTIL[table]).fetch(connection, key=key)
    return (found[0].locked_until if found else None) or utcnow()


def _phantom_attempt(core: Core, login: str) -> None:
    """Count failures for a login that matches nobody exactly as for a real user."""
    key = tokens.keyed_digest(core.secret_key, "login:" + casefold(login))
    maximum = core.site["lockout.max_failed_attempts"]
    duration = timedelta(seconds=core.site["lockout.duration_seconds"])
    with core.db.write() as session:
        # INSERT … ON CONFLICT DO NOTHING: parallel first attempts for one login never collide.
        insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        session.execute(insert(FAILURES)
                        .values(login_hash=key, failed_count=0, updated_at=utcnow())
                        .on_conflict_do_nothing(index_elements=["login_hash"]))
        connection = core.db.dbapi(session)
        if not _reserve_attempt(core.db, connection, FAILURES, key, maximum, duration):
            locked_until = _locked_until(core.db, connection, FAILURES, key)
            raise Locked(locked_until)
    core.hasher.verify(None, "x" * 16)
    raise InvalidCredentials()


# -- sign-in ------------------------------------------------------------------------------------
#
# Sign-in is the one write every visitor makes, so it uses plain SQL statements rather than ORM
# objects: ORM loading and flushing cost several times the queries themselves, and every
# millisecond here is a millisecond the cores are not verifying passwords.

LOGIN_COLUMNS = (USERS.c.id, USERS.c.password_hash, USERS.c.lockout_enabled,
                 USERS.c.locked_until)
LOGIN_BY_USERNAME = select(*LOGIN_COLUMNS).where(USERS.c.username_key == bindparam("key"))
LOGIN_BY_EMAIL = select(*LOGIN_COLUMNS).where(USERS.c.email_key == bindparam("key")).limit(2)


def _count(statement: Select[Any]) -> Any:
    return select(func.count()).select_from(statement.subquery()).scalar_subquery()


def _user_columns() -> list[Any]:
    """Every user column, and how many roles and external identities the user has."""
    return [*USERS.c,
            _count(select(user_roles.c.role_id).where(user_roles.c.user_id == USERS.c.id))
            .label("role_count"),
            _count(select(ExternalIdentity.__table__.c.id)
                   .where(ExternalIdentity.__table__.c.user_id == USERS.c.id))
            .label("identity_count")]


USER_LOOKUP = select(*_user_columns()).where(USERS.c.id == bindparam("user_id"))
# A right password: the failure count and any lock go, the temporary password is used (so it no
# longer dies of old age), and a hash with old parameters is replaced when one is given.
SIGNED_IN = (update(USERS).where(USERS.c.id == bindparam("user_id"))
             .values(failed_count=0, locked_until=None, last_sign_in_at=bindparam("now"),
                     updated_at=bindparam("now"), password_temporary=False,
                     password_hash=func.coalesce(bindparam("new_hash", type_=Text()),
                                                 USERS.c.password_hash)))
OPEN_SESSION = insert(SESSIONS)
# A right password for an account that may not sign in: the failures it counted go.
CLEAR_FAILURES = (update(USERS).where(USERS.c.id == bindparam("user_id"))
                  .values(failed_count=0, locked_until=None, updated_at=bindparam("now")))
# Every signed-in request starts with SESSION_LOOKUP; EXTRAS_LOOKUP follows only for users who
# have roles or external identities.
SESSION_LOOKUP = (
    select(SESSIONS.c.id.label("session_id"), SESSIONS.c.expires_at.label("session_expires_at"),
           SESSIONS.c.security_stamp.label("session_stamp"), *_user_columns())
    .join(USERS, USERS.c.id == SESSIONS.c.user_id)
    .where(SESSIONS.c.token_hash == bindparam("token_hash")))
EXTRAS_LOOKUP = union_all(
    select(literal("role").label("kind"), Role.name.label("name"),
           literal("", String).label("subject"))
    .join(user_roles, user_roles.c.role_id == Role.id)
    .where(user_roles.c.user_id == bindparam("user_id")),
    select(literal("identity"), ExternalIdentity.provider, ExternalIdentity.subject)
    .where(ExternalIdentity.user_id == bindparam("user_id")))


def _public(row: Any, extras: Iterable[Any], **changes: Any) -> dict[str, Any]:
    """`users.user_public` of a row from USER_LOOKUP or SESSION_LOOKUP, with `changes` made."""
    roles = [extra.name for extra in extras if extra.kind == "role"]
    identities = [(extra.name, extra.subject) for extra in extras if extra.kind == "identity"]
    user = SimpleNamespace(**{**row._asdict(), **changes}) if changes else row
    return public_view(user, roles, identities)


def _find_login(core: Core, connection: Any, login: str) -> Any:
    key = casefold(login)
    found = core.db.prepared(LOGIN_BY_USERNAME).fetch(connection, key=key)
    if not found and "@" in login and core.site["login.by_email"]:
        found = core.db.prepared(LOGIN_BY_EMAIL).fetch(connection, key=key)
        if len(found) != 1:  # a shared email is no login: it names no one user
            return None
    return found[0] if found else None


def signin(core: Core, ctx: Context, login: str, password: str) -> SignedIn:
    if not login or len(login) > MAX_LOGIN_LENGTH or not password \
            or len(password) > MAX_PASSWORD_INPUT:
        core.metrics.signins.labels("invalid_credentials").inc()
        raise InvalidCredentials()
    maximum = core.site["lockout.max_failed_attempts"]
    duration = timedelta(seconds=core.site["lockout.duration_seconds"])

    with core.db.raw_write() as connection:
        found = _find_login(core, connection, login)
        if found is not None:
            if not found.lockout_enabled and found.locked_until is not None \
                    and found.locked_until > utcnow():  # an admin's lock holds regardless
                core.metrics.signins.labels("locked").inc()
                raise Locked(found.locked_until)
            if found.lockout_enabled and not _reserve_attempt(core.db, connection, USERS,
                                                              found.id, maximum, duration):
                locked_until = _locked_until(core.db, connection, USERS, found.id)
                core.metrics.signins.labels("locked").inc()
                raise Locked(locked_until)
    if found is None:
        try:
            _phantom_attempt(core, login)
        except (Locked, InvalidCredentials) as exc:
            core.metrics.signins.labels(exc.code).inc()
            raise
    user_id, stored_hash = found.id, found.password_hash

    verification = core.hasher.verify(stored_hash, password)
    # Re-hash outside the transaction: no write lock is held while argon2 runs.
    new_hash = core.hasher.hash(password) if verification.ok and verification.needs_rehash \
        else None

    # A refusal is raised only after the transaction commits, so the failure count, its
    # events and a reset count are kept whatever the answer.
    refusal: InvalidCredentials | LoginDisabled | EmailNotVerified | None = None
    with core.db.raw_write() as connection:
        found_now = core.db.prepared(USER_LOOKUP).fetch(connection, user_id=user_id)
        if not found_now:  # deleted meanwhile
            raise InvalidCredentials()
        user = found_now[0]
        temporary_dead = user.password_temporary and user.password_changed_at is not None and \
            user.password_changed_at < utcnow() - timedelta(
                hours=core.site["password.temporary_lifetime_hours"])
        if not verification.ok or temporary_dead or user.password_hash != stored_hash:
            written = _record_failure(core, connection, ctx, user, maximum)
            refusal = InvalidCredentials()
        elif not user.login_enabled or (core.site["registration.require_email_verification"]
                                        and not user.email_verified):
            # The password is right: from here on, answers may say who this is.
            refusal = LoginDisabled() if not user.login_enabled else EmailNotVerified()
            written = []
            if user.failed_count or user.locked_until is not None:
                core.db.prepared(CLEAR_FAILURES).execute(connection, user_id=user_id,
                                                         now=utcnow())
        else:
            signed_in, written = _complete_signin(core, connection, ctx, user, new_hash)
    events.log_committed(written)
    if refusal is not None:
        core.metrics.signins.labels(refusal.code).inc()
        raise refusal
    return signed_in


def _extras(core: Core, connection: Any, user: Any) -> list[Any]:
    """The roles and external identities of a USER_LOOKUP row (a query only if it has any)."""
    if not (user.role_count or user.identity_count):
        return []
    return core.db.prepared(EXTRAS_LOOKUP).fetch(connection, user_id=user.id)


def _complete_signin(core: Core, connection: Any, ctx: Context, user: Any,
                     new_hash: str | None) -> tuple[SignedIn, list[events.Recorded]]:
    now = utcnow()
    core.db.prepared(SIGNED_IN).execute(connection, user_id=user.id, now=now, new_hash=new_hash)
    raw, session_id = _open_session(core, connection, ctx, user.id, user.security_stamp)
    public = _public(user, _extras(core, connection, user), failed_count=0, locked_until=None,
                     last_sign_in_at=now, updated_at=now, password_temporary=False,
                     password_hash=new_hash or user.password_hash)
    must_change = password_change_required(core, user)
    written = events.write_now(connection, core.db.engine.dialect, ctx, (
        "user.signed_in", {"user": public, "method": "password",
                           "password_change_required": must_change}, user.id))
    core.metrics.signins.labels("password_change_required" if must_change else "ok").inc()
    return SignedIn(user_id=user.id, user=public, token=raw, session_id=session_id,
                    password_change_required=must_change), written


def _record_failure(core: Core, connection: Any, ctx: Context, user: Any,
                    maximum: int) -> list[events.Recorded]:
    # The attempt was counted when it was reserved; a lock set by it is now for real.
    public = _public(user, _extras(core, connection, user))
    happened = [("user.sign_in_failed", {"user": public, "failed_count": user.failed_count},
                 user.id)]
    if user.lockout_enabled and user.failed_count >= maximum and user.locked_until is not None:
        happened.append(("user.locked", {"user": public, "reason": "failed_sign_ins"}, user.id))
    return events.write_now(connection, core.db.engine.dialect, ctx, *happened)


def _open_session(core: Core, connection: Any, ctx: Context, user_id: str,
                  security_stamp: str) -> tuple[str, str]:
    raw = tokens.new_secret()
    now = utcnow()
    session_id = new_id()
    core.db.prepared(OPEN_SESSION).execute(
        connection, id=session_id, token_hash=tokens.digest(raw), user_id=user_id,
        security_stamp=security_stamp, created_at=now,
        expires_at=now + timedelta(hours=core.site["session.lifetime_hours"]),
        ip_address=ctx.ip_address, user_agent=(ctx.user_agent or "")[:500] or None)
    return raw, session_id


def open_session(core: Core, session: Session, ctx: Context, user: User) -> tuple[str, str]:
    """For sign-in paths other than a password (external login): returns (token, session id)."""
    session.flush()  # the user may be new in this transaction
    return _open_session(core, core.db.dbapi(session), ctx, user.id, user.security_stamp)


@dataclass
class Authenticated:
    user_id: str
    username: str
    session_id: str
    password_change_required: bool
    user: dict[str, Any]  # the CONTRACT's user object, as `users.user_public` makes it


def authenticate(core: Core, raw: str | None, *, on_loop: bool = False) -> Authenticated | None:
    """The user behind a session token, if the session is alive and its stamp is current.

    Every signed-in request starts here, so it is one indexed read (two when the user has
    roles or external identities) straight on a DBAPI connection. On a local database that is
    quick enough to run on the event loop (`on_loop`), where a hop to a thread would cost more
    than the read itself.
    """
    if not raw or len(raw) > 200:
        return None
    with core.db.raw(on_loop=on_loop) as connection:
        found = core.db.prepared(SESSION_LOOKUP).fetch(connection,
                                                       token_hash=tokens.digest(raw))
        if not found:
            return None
        row = found[0]
        if row.session_expires_at <= utcnow() or row.session_stamp != row.security_stamp \
                or not row.login_enabled:
            return None
        extras = core.db.prepared(EXTRAS_LOOKUP).fetch(connection, user_id=row.id) \
            if row.role_count or row.identity_count else []
    return Authenticated(user_id=row.id, username=row.username, session_id=row.session_id,
                         password_change_required=password_change_required(core, row),
                         user=_public(row, extras))


def signout(core: Core, raw: str | None) -> None:
    if not raw:
        return
    with core.db.write() as session:
        session.execute(delete(UserSession).where(UserSession.token_hash == tokens.digest(raw)))


# -- passwords ----------------------------------------------------------------------------------

def change_password(core: Core, ctx: Context, user_id: str, session_id: str | None,
                    current: str, new: str) -> User:
    """Change one's own password: other sessions die, this one lives on with the new stamp."""
    with core.db.read() as session:
        user = session.get(User, user_id)
        if user is None:
            raise InvalidCredentials()
        stored = user.password_hash
        username, email = user.username, user.email
    if not current or len(current) > MAX_PASSWORD_INPUT or \
            not core.hasher.verify(stored, current).ok:
        raise InvalidCredentials("The current password is incorrect.", field="current_password")
    if new == current:
        raise InvalidInput("Choose a password different from the current one.",
                           field="new_password")
    check_new_password(core, new, username, email)
    new_hash = core.hasher.hash(new)
    with core.db.write() as session:
        user = session.get(User, user_id)
        if user is None or user.password_hash != stored:
            raise InvalidCredentials("The current password is incorrect.",
                                     field="current_password")
        set_password(core, session, ctx, user, new_hash, keep_session_id=session_id,
                     event="user.password_changed", how="changed by you")
        return user


def check_new_password(core: Core, password: str, username: str | None,
                       email: str | None) -> None:
    try:
        policy.check(password, min_length=core.site["password.min_length"],
                     check_common=core.site["password.check_common"],
                     user_inputs=(username, email))
    except InvalidInput as exc:
        exc.field = "new_password"
        raise


def set_password(core: Core, session: Session, ctx: Context, user: User, new_hash: str, *,
                 keep_session_id: str | None, event: str, how: str) -> None:
    """Store a password the user chose; used by change, reset and set-password links."""
    rotate_credentials(session, user, keep_session_id=keep_session_id)
    now = utcnow()
    user.password_hash = new_hash
    user.password_changed_at = now
    user.password_expired = False
    user.password_temporary = False
    user.failed_count = 0
    user.locked_until = None
    user.updated_at = now
    session.flush()
    if user.email:
        queue_mail(session, core, "password_changed", user.email,
                   {"username": user.username, "how": how,
                    "forgot_url": core.link("/password/forgot")})
    events.record(session, ctx, event, {"user": user_public(user)}, user_id=user.id)


# -- admin API keys -----------------------------------------------------------------------------

def create_api_key(core: Core, name: str, scopes: list[str]) -> tuple[ApiKey, str]:
    name = name.strip()
    if not name:
        raise InvalidInput("An API key needs a name.", field="name")
    scopes = list(dict.fromkeys(scopes or ["admin"]))
    unknown = [scope for scope in scopes if scope not in SCOPES]
    if unknown:
        raise InvalidInput(f"There is no scope called '{unknown[0]}'; use one of "
                           f"{', '.join(SCOPES)}.", field="scope")
    raw = "gp_" + tokens.new_secret()
    with core.db.write() as session:
        key = ApiKey(id=new_id(), name=name, prefix=raw[:10], token_hash=tokens.digest(raw),
                     scopes=scopes, created_at=utcnow())
        session.add(key)
    return key, raw


def count_api_keys(core: Core) -> int:
    with core.db.read() as session:
        return len(list(session.scalars(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)))))


def authenticate_api_key(core: Core, raw: str | None) -> ApiKey | None:
    if not raw or not raw.startswith("gp_") or len(raw) > 200:
        return None
    with core.db.read() as session:
        key = session.scalar(select(ApiKey).where(ApiKey.token_hash == tokens.digest(raw)))
    if key is None or key.revoked_at is not None:
        return None
    return key
