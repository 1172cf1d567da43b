"""`gatepass users import FILE` and `gatepass users export [FILE]` (CONTRACT §2).

Exit status of an import: 0 when the file was read, even if some lines failed (they are
listed on stderr with the summary; `--strict` makes that exit 1); 1 when the file itself is
unusable or the database refuses us.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from gatepass.context import CLI


def users_import(
        file: Annotated[Path, typer.Argument(help="JSON Lines, or CSV when it ends in .csv.")],
        upsert: Annotated[str | None, typer.Option(
            help="Update users that match by 'username' or 'email' instead of failing.")] = None,
        source: Annotated[str, typer.Option(
            "--from", help="'power-pages' for a Dataverse contact export (CSV).")] = "gatepass",
        external_identities: Annotated[Path | None, typer.Option(
            "--external-identities",
            help="With --from power-pages: an adx_externalidentity export (CSV).")] = None,
        strict: Annotated[bool, typer.Option(
            "--strict", help="Exit 1 when any line failed.")] = False,
) -> None:
    """Import users; each bad line is reported and changes nothing, the others import."""
    from rich.console import Console
    from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    from gatepass.cli import fail, opened
    from gatepass.importer.files import import_file

    if upsert not in (None, "username", "email"):
        raise fail("--upsert must be 'username' or 'email'.", 2)
    if not file.is_file():
        raise fail(f"There is no file at {file}.")
    err = Console(stderr=True)
    started = time.perf_counter()
    with opened() as core:
        # What start-up made (modules, mappers) lives as long as this command: frozen, the
        # collector stops walking it every time the import's garbage sets off a full pass.
        gc.freeze()
        columns = (TextColumn("Importing"), BarColumn(), TaskProgressColumn(),
                   TextColumn("{task.fields[lines]:,} lines, {task.fields[rate]:,.0f}/s"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        with Progress(*columns, console=err, transient=False) as progress:
            task = progress.add_task("import", total=file.stat().st_size or 1, lines=0, rate=0.0)

            def on_progress(done: int, lines: int) -> None:
                elapsed = max(time.perf_counter() - started, 1e-6)
                progress.update(task, completed=done, lines=lines, rate=lines / elapsed)

            summary = import_file(core, CLI.but(triggered_by="import"), file,
                                  upsert=upsert, source=source,
                                  identities=external_identities, on_progress=on_progress)
    elapsed = time.perf_counter() - started
    for item in summary.failed:
        err.print(f"line {item['line']}: {item['error']}", markup=False, highlight=False)
    typer.echo(f"{summary.created} created, {summary.updated} updated, "
               f"{len(summary.failed)} failed in {elapsed:.1f} s.")
    if strict and summary.failed:
        raise typer.Exit(1)


def users_export(
        file: Annotated[Path | None, typer.Argument(
            help="Where to write (CSV when it ends in .csv); default: standard output.")] = None,
        include_password_hashes: Annotated[bool, typer.Option(
            "--include-password-hashes",
            help="Add each password hash, so another Gatepass can take the users over.")] = False,
) -> None:
    """Export every user as JSON Lines (or CSV), in the form `users import` reads."""
    from gatepass.cli import opened
    from gatepass.importer import export

    with opened() as core:
        if file is not None and file.suffix.lower() == ".csv":
            with file.open("w", newline="", encoding="utf-8") as handle:
                for chunk in export.csv_lines(core,
                                              include_password_hashes=include_password_hashes):
                    handle.write(chunk)
            return
        target = file.open("wb") if file is not None else sys.stdout.buffer
        try:
            for line in export.json_lines(core, include_password_hashes=include_password_hashes):
                target.write(line)
        finally:
            if file is not None:
                target.close()
            else:
                target.flush()
