"""Importing from a file: JSON Lines, CSV (by extension), or a Power Pages contact export."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from gatepass.context import Context
from gatepass.errors import InvalidInput
from gatepass.importer import powerpages
from gatepass.importer.parse import LineError, parse_csv_row
from gatepass.importer.service import Importer, Summary

if TYPE_CHECKING:
    from gatepass.core import Core

SOURCES = ("gatepass", "power-pages")


def file_kind(path: Path) -> str:
    return "csv" if path.suffix.lower() == ".csv" else "jsonl"


def import_file(core: Core, ctx: Context, path: Path, *, upsert: str | None = None,
                source: str = "gatepass", identities: Path | None = None,
                on_progress: Callable[[int, int], None] | None = None) -> Summary:
    """Stream the file through an Importer; `on_progress(bytes read, lines read)`."""
    if source not in SOURCES:
        raise InvalidInput(f"--from must be one of {', '.join(SOURCES)}.", field="from")
    if identities is not None and source != "power-pages":
        raise InvalidInput("--external-identities goes with --from power-pages.",
                           field="external_identities")
    for file in (path, identities):
        if file is not None and not file.is_file():
            raise InvalidInput(f"There is no file at {file}.")
    importer = Importer(core, ctx, upsert=upsert)
    progress = on_progress or (lambda _bytes, _lines: None)
    try:
        if source == "power-pages":
            links = powerpages.read_identities(identities, importer.provider_for_issuer) \
                if identities else {}
            with path.open("rb") as raw, _text(raw) as handle:
                for number, row in powerpages.contact_rows(handle):
                    _add(importer, number,
                         lambda n=number, r=row: powerpages.contact_record(n, r, links))
                    if number % 500 == 0:
                        progress(raw.tell(), number)
        elif file_kind(path) == "csv":
            with path.open("rb") as raw, _text(raw) as handle:
                reader = csv.DictReader(handle)
                for row in reader:
                    _add(importer, reader.line_num,
                         lambda n=reader.line_num, r=row: parse_csv_row(n, r))
                    if reader.line_num % 500 == 0:
                        progress(raw.tell(), reader.line_num)
        else:
            with path.open("rb") as raw:
                for number, line in enumerate(raw, 1):
                    importer.add_json_line(number, line)
                    if number % 500 == 0:
                        progress(raw.tell(), number)
    except LineError as exc:  # the file as a whole is not what it should be
        raise InvalidInput(str(exc)) from None
    summary = importer.finish()
    progress(path.stat().st_size, importer.lines)
    return summary


def _text(raw: IO[bytes]) -> Any:
    import io

    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def _add(importer: Importer, number: int, make: Callable[[], Any]) -> None:
    try:
        record = make()
    except LineError as exc:
        importer.add_error(number, str(exc))
        return
    importer.add_record(record)
