"""Power Pages (Dataverse) contact exports → import records.

A contact CSV carries the portal identity in `adx_identity_*` columns; external logins are
rows of `adx_externalidentity` (subject, provider name = the issuer, and the contact).
Columns not named here are ignored, so a full Dataverse export can be fed as it is.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gatepass.importer.parse import LineError, Record, parse_bool, to_record

CONTACT_COLUMNS = {
    "adx_identity_username": "username",
    "emailaddress1": "email",
    "firstname": "first_name",
    "lastname": "last_name",
    "mobilephone": "phone",
    "parentcustomerid": "account",
    "adx_identity_passwordhash": "password_hash",
    "adx_identity_securitystamp": "security_stamp",
}
FLAGS = {
    "adx_identity_lockoutenabled": "lockout_enabled",
    "adx_identity_emailaddress1confirmed": "email_verified",
    "adx_identity_logonenabled": "login_enabled",
}
CONTACT_ID_ATTRIBUTE = "powerpages_contactid"


def contact_id(value: str | None) -> str:
    """Dataverse ids are GUIDs, written with or without braces and in either case."""
    return (value or "").strip().strip("{}").lower()


def read_identities(path: Path, provider_for_issuer: Callable[[str], str]
                    ) -> dict[str, list[dict[str, str]]]:
    """contact id → its external logins. Held in memory: one small dict per login."""
    found: dict[str, list[dict[str, str]]] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        contact_column = next((c for c in ("adx_contactid", "contactid") if c in columns), None)
        if not {"adx_username", "adx_identityprovidername"} <= columns or contact_column is None:
            raise LineError(f"{path.name} is not an adx_externalidentity export: it needs the "
                            "columns adx_username, adx_identityprovidername and adx_contactid.")
        for row in reader:
            subject = (row.get("adx_username") or "").strip()
            issuer = (row.get("adx_identityprovidername") or "").strip()
            owner = contact_id(row.get(contact_column))
            if subject and issuer and owner:
                found.setdefault(owner, []).append(
                    {"provider": provider_for_issuer(issuer)[:100], "issuer": issuer,
                     "subject": subject})
    return found


def contact_record(line_number: int, row: dict[str, Any],
                   identities: dict[str, list[dict[str, str]]]) -> Record:
    data: dict[str, Any] = {}
    for column, name in CONTACT_COLUMNS.items():
        value = (row.get(column) or "").strip()
        if value:
            data[name] = value
    if "security_stamp" in data:
        data["security_stamp"] = data["security_stamp"][:64]
    if "password_hash" in data:
        data["password_hash_format"] = "aspnet_identity"
    for column, name in FLAGS.items():
        value = (row.get(column) or "").strip()
        if value:
            data[name] = parse_bool(column, value)
    count = (row.get("adx_identity_accessfailedcount") or "").strip()
    if count:
        try:
            data["failed_count"] = int(count)
        except ValueError:
            raise LineError("'adx_identity_accessfailedcount' must be a whole number.") from None
    lock_end = (row.get("adx_identity_lockoutenddate") or "").strip()
    if lock_end:
        data["locked_until"] = lock_end
    owner = contact_id(row.get("contactid"))
    if owner:
        data["attributes"] = {CONTACT_ID_ATTRIBUTE: owner}
        if owner in identities:
            data["external_identities"] = identities[owner]
    try:
        return to_record(line_number, data)
    except LineError as exc:  # name the Power Pages column, not ours
        message = str(exc)
        for column, name in {**CONTACT_COLUMNS, **FLAGS,
                             "adx_identity_lockoutenddate": "locked_until",
                             "adx_identity_accessfailedcount": "failed_count"}.items():
            message = message.replace(f"'{name}'", f"'{column}'")
        raise LineError(message) from None


def contact_rows(handle: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each contact; the line is where the row ends in the file."""
    reader = csv.DictReader(handle)
    if "emailaddress1" not in (reader.fieldnames or ()) and \
            "adx_identity_username" not in (reader.fieldnames or ()):
        raise LineError("The file is not a Power Pages contact export: it needs the columns "
                        "adx_identity_username or emailaddress1.")
    for row in reader:
        yield reader.line_num, row
