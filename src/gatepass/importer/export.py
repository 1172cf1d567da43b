"""Export every user as the import reads it: the public user object plus what moving needs.

Pages of users are read by (created_at, id), each in its own short read transaction, so an
export of any size streams in flat memory and never holds a long transaction open.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select

from gatepass.importer.parse import exported_hash, hash_format
from gatepass.users.models import Account, User
from gatepass.users.service import user_public

if TYPE_CHECKING:
    from gatepass.core import Core

PAGE = 1000

CSV_COLUMNS = (
    "id", "username", "email", "email_verified", "first_name", "last_name", "phone",
    "account_id", "account", "roles", "attributes", "login_enabled", "lockout_enabled",
    "failed_count", "locked_until", "password_expired", "external_identities", "created_at",
    "last_sign_in_at", "password_hash", "password_hash_format", "password_changed_at",
)


def export_users(core: Core, *, include_password_hashes: bool = False
                 ) -> Iterator[dict[str, Any]]:
    """Each user as one dict: the public object, `account` (its name), `failed_count`,
    external identities with their issuer, and with `include_password_hashes` the hash, its
    format and when it was set. Read-only fields (`password_set`, `updated_at`) are kept
    for reading; an import ignores them."""
    after: tuple[Any, str] | None = None
    while True:
        query = select(User).order_by(User.created_at, User.id).limit(PAGE)
        if after is not None:
            query = query.where(or_(User.created_at > after[0],
                                    (User.created_at == after[0]) & (User.id > after[1])))
        with core.db.read() as session:
            page = list(session.scalars(query))
            account_ids = {user.account_id for user in page if user.account_id}
            accounts = dict(session.execute(select(Account.id, Account.name)
                                            .where(Account.id.in_(account_ids))).tuples().all()) \
                if account_ids else {}
            lines = [_line(user, accounts, include_password_hashes) for user in page]
        yield from lines
        if len(page) < PAGE:
            return
        after = (page[-1].created_at, page[-1].id)


def _line(user: User, accounts: dict[str, str], hashes: bool) -> dict[str, Any]:
    line = user_public(user)
    line["account"] = accounts.get(user.account_id) if user.account_id else None
    line["failed_count"] = user.failed_count
    line["external_identities"] = [{"provider": x.provider, "issuer": x.issuer,
                                    "subject": x.subject} for x in user.external_identities]
    if hashes and user.password_hash:
        line["password_hash"] = exported_hash(user.password_hash)
        line["password_hash_format"] = hash_format(user.password_hash)
        line["password_changed_at"] = user.password_changed_at.isoformat() \
            if user.password_changed_at else None
    return line


def json_lines(core: Core, *, include_password_hashes: bool = False) -> Iterator[bytes]:
    for line in export_users(core, include_password_hashes=include_password_hashes):
        yield (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def csv_lines(core: Core, *, include_password_hashes: bool = False) -> Iterator[str]:
    """The same users as CSV: roles `;`-separated, attributes and identities as JSON."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for line in export_users(core, include_password_hashes=include_password_hashes):
        row = {key: _cell(key, line.get(key)) for key in CSV_COLUMNS}
        writer.writerow(row)
        if buffer.tell() > 64_000:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if key == "roles":
        return ";".join(value)
    if key in ("attributes", "external_identities"):
        return json.dumps(value, ensure_ascii=False) if value else ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
