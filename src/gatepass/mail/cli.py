"""`gatepass worker`, `gatepass mail list`, `gatepass mail retry ID`."""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated

import typer

mail_app = typer.Typer(no_args_is_help=True, help="Queued and sent mail.")


def worker_command() -> None:
    """Deliver queued mail and webhooks until stopped (SIGTERM or Ctrl-C); safe to run several."""
    from gatepass.cli import opened
    from gatepass.outbox.worker import Worker

    with opened() as core:
        from gatepass import logs

        logs.configure(core.settings.log_level)

        async def main() -> None:
            worker = Worker(core)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, worker.request_stop)
            await worker.run()

        asyncio.run(main())


@mail_app.command("list")
def mail_list(
        limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 20,
        status: Annotated[str | None, typer.Option(help="pending, sent or dead.")] = None,
) -> None:
    """Show the latest messages: id, status, recipient, subject, attempts, created."""
    from rich.console import Console
    from rich.table import Table

    from gatepass.cli import fail, opened
    from gatepass.outbox import service

    if status not in (None, "pending", "sent", "dead"):
        raise fail("--status must be pending, sent or dead.", 2)
    with opened() as core:
        messages = service.latest(core, status=status, limit=limit)
    table = Table("id", "status", "to", "subject", "attempts", "created", box=None)
    for message in messages:
        table.add_row(message.id, message.status, str(message.payload.get("to", "")),
                      str(message.payload.get("subject", "")), str(message.attempts),
                      message.created_at.strftime("%Y-%m-%d %H:%M:%S"))
    Console(width=200).print(table)


@mail_app.command("retry")
def mail_retry(message_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Queue a dead message again."""
    from gatepass.cli import opened
    from gatepass.outbox import service

    with opened() as core:
        message = service.retry(core, message_id)
        typer.echo(f"Message {message.id} to {message.payload.get('to')} is queued again.")
