"""`gatepass invite`: invitations from the command line, one by one or from a CSV file."""

from __future__ import annotations

import csv
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from gatepass.context import CLI
from gatepass.errors import validation_reason
from gatepass.invitations import service
from gatepass.invitations.schemas import InvitationCreate, Invitee

DURATION = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$")
UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
COLUMNS = ("email", "first_name", "last_name", "account", "roles")


def parse_duration(value: str) -> timedelta:
    match = DURATION.match(value)
    if not match or int(match.group(1)) == 0:
        raise typer.BadParameter("give a duration such as 30m, 12h, 7d or 2w.")
    return timedelta(**{UNITS[match.group(2)]: int(match.group(1))})


def read_csv(path: Path) -> tuple[list[tuple[int, Invitee]], list[tuple[int, str | None, str]]]:
    """Rows as invitees (with their line numbers), and the lines that could not be read."""
    rows: list[tuple[int, Invitee]] = []
    bad: list[tuple[int, str | None, str]] = []
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror}.") from None
    with handle:
        reader = csv.DictReader(handle)
        fields = [name.strip().lower() for name in (reader.fieldnames or [])]
        if "email" not in fields:
            raise typer.BadParameter(f"{path} needs a header row with an 'email' column "
                                     f"(columns: {', '.join(COLUMNS)}).")
        reader.fieldnames = fields
        for record in reader:
            line = reader.line_num
            values = {k: (v or "").strip() for k, v in record.items() if k in COLUMNS}
            try:
                rows.append((line, Invitee(
                    email=values.get("email", ""), first_name=values.get("first_name") or None,
                    last_name=values.get("last_name") or None,
                    account_id=values.get("account") or None,
                    roles=[r.strip() for r in values.get("roles", "").split(";") if r.strip()])))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "row"
                bad.append((line, values.get("email") or None,
                            f"{where}: {validation_reason(first)}."))
    return rows, bad


def invite(
        email: Annotated[list[str] | None, typer.Option(
            "--email", help="Invitee's email; repeatable.")] = None,
        csv_file: Annotated[Path | None, typer.Option(
            "--csv", help="CSV with columns email, first_name, last_name, account, roles "
                          "(roles separated by ';').")] = None,
        group: Annotated[bool, typer.Option(
            "--group", help="One shared code for everyone, instead of one code each.")] = False,
        max_redemptions: Annotated[int | None, typer.Option(
            min=1, help="Group invitations: how many may redeem (default: no limit).")] = None,
        expires_in: Annotated[str | None, typer.Option(
            help="e.g. 7d, 12h, 2w (default: invitation.default_expiry_days).")] = None,
        role: Annotated[list[str] | None, typer.Option(
            help="Role given on redemption; repeatable.")] = None,
        account: Annotated[str | None, typer.Option(
            help="Account (id or name) given on redemption.")] = None,
        inviter: Annotated[str | None, typer.Option(help="The inviting user's id.")] = None,
        send_email: Annotated[bool, typer.Option(
            "--send-email/--no-send-email", help="Mail the invitation.")] = True,
        on_redeem_email: Annotated[bool, typer.Option(
            "--thank-you/--no-thank-you", help="Mail a thank-you on redemption.")] = False,
        dry_run: Annotated[bool, typer.Option(
            "--dry-run", help="Check every row and say what would happen; change nothing.")] = False,
) -> None:
    """Invite people, as POST /admin/api/v1/invitations. Prints `email,redeem_url` lines."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeRemainingColumn

    from gatepass.cli import fail, opened

    if not email and csv_file is None and not group:
        raise fail("Give --email, --csv FILE, or --group.", 2)
    if max_redemptions is not None and not group:
        raise fail("--max-redemptions needs --group.", 2)
    try:
        expires_at = (datetime.now(timezone.utc) + parse_duration(expires_in)) \
            if expires_in else None
        rows, bad = read_csv(csv_file) if csv_file is not None else ([], [])
    except typer.BadParameter as exc:
        raise fail(str(exc).capitalize() if str(exc)[:1].islower() else str(exc)) from None
    lines = [line for line, _ in rows]
    try:
        data = InvitationCreate(
            type="group" if group else "single", emails=email or [],
            invitees=[invitee for _, invitee in rows], max_redemptions=max_redemptions,
            expires_at=expires_at, inviter_id=inviter, account_id=account, roles=role or [],
            send_email=send_email, on_redeem_email=on_redeem_email)
    except ValidationError as exc:
        first = exc.errors()[0]
        option = f"--{first['loc'][0]}".replace("_", "-")
        raise fail(f"{option}: {validation_reason(first)}.") from None

    err = Console(stderr=True)
    total = len(data.emails) + len(data.invitees)
    with opened() as core:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=err, transient=True,
                      disable=csv_file is None) as bar:
            task = bar.add_task("Checking" if dry_run else "Inviting", total=total or 1)
            outcome = service.create_invitations(
                core, CLI, data, dry_run=dry_run,
                progress=lambda n: bar.advance(task, n))

        out = sys.stdout
        explicit = len(data.emails)

        def where(index: int) -> str:
            if index < explicit:
                return f"--email #{index + 1}"
            if index - explicit < len(lines):
                return f"line {lines[index - explicit]}"
            return f"#{index + 1}"

        failures = [(f"line {line}", address, error) for line, address, error in bad]
        failures += [(where(f.index), f.email, f.error) for f in outcome.failed]
        for issued in outcome.issued:
            row = issued.invitation
            target = row.email or "(group)"
            if dry_run:
                extras = [f"account {row.account_id}"] if row.account_id else []
                extras += [f"roles {', '.join(row.roles)}"] if row.roles else []
                extras += ["bound to an existing contact"] if row.user_id else []
                suffix = f" ({'; '.join(extras)})" if extras else ""
                out.write(f"would invite {target}{suffix}\n")
            else:
                out.write(f"{target},{service.redeem_url(core, issued.code)}\n")
        for place, address, error in failures:
            err.print(f"{place}{f' ({address})' if address else ''}: {error}", markup=False,
                      highlight=False)
        verb = "Would create" if dry_run else "Created"
        kind = "group invitation" if group else "invitation"
        err.print(f"{verb} {len(outcome.issued)} {kind}{'s' if len(outcome.issued) != 1 else ''}"
                  f", {'would queue' if dry_run else 'queued'} {outcome.mails} mail"
                  f"{'s' if outcome.mails != 1 else ''}, skipped {len(failures)} "
                  f"row{'s' if len(failures) != 1 else ''} with errors.", markup=False,
                  highlight=False)
        if failures:
            raise typer.Exit(1)
