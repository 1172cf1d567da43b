"""`gatepass`: the command line (CONTRACT §2). Errors are one sentence on stderr, exit 1."""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import typer
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from gatepass import errors
from gatepass.context import CLI
from gatepass.core import Core, build_core
from gatepass.external.cli import providers_app
from gatepass.importer.cli import users_export, users_import
from gatepass.invitations.cli import invite as invite_command
from gatepass.mail.cli import mail_app, worker_command
from gatepass.settings import ConfigError, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Gatepass: who gets into your portal, and how they are brought in.")
api_key_app = typer.Typer(no_args_is_help=True, help="Admin API keys.")
users_app = typer.Typer(no_args_is_help=True, help="Portal users.")
settings_app = typer.Typer(no_args_is_help=True, help="Site settings.")
app.add_typer(api_key_app, name="api-key")
app.add_typer(users_app, name="users")
users_app.command("import")(users_import)
users_app.command("export")(users_export)
app.add_typer(settings_app, name="settings")
app.add_typer(mail_app, name="mail")
app.command("worker")(worker_command)
app.command("invite")(invite_command)
app.add_typer(providers_app, name="providers")

T = TypeVar("T")


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


def shown_url(url: str) -> str:
    """A database URL fit for a message: its password masked."""
    return make_url(url).render_as_string(hide_password=True)


@contextmanager
def opened(migrate: bool = True) -> Iterator[Core]:
    """Settings, logs and the core; every error becomes one sentence on stderr."""
    from gatepass import logs
    from gatepass.migrate import upgrade

    try:
        settings = load_settings()
    except ConfigError as exc:
        raise fail(str(exc)) from None
    logs.configure(os.environ.get("GATEPASS_CLI_LOG_LEVEL", "WARNING"))
    core = build_core(settings)
    try:
        if migrate:
            try:
                upgrade(core.db.engine)
            except Exception as exc:  # the database is unreachable or refuses us
                raise fail(f"Cannot open the database at {shown_url(settings.database_url)}: "
                           f"{str(exc).splitlines()[0]}") from None
        try:
            yield core
        except errors.GatepassError as exc:
            raise fail(exc.message) from None
        except DBAPIError as exc:  # the database went away or refused a statement midway
            reason = str(exc.orig or exc).strip().splitlines()[0].rstrip(".")
            raise fail(f"The database at {shown_url(settings.database_url)} failed: "
                       f"{reason}.") from None
    finally:
        core.close()


def run(fn: Callable[[Core], T]) -> T:
    with opened() as core:
        return fn(core)


# -- serving ------------------------------------------------------------------------------------

@app.command()
def serve(host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
          workers: Annotated[int, typer.Option(min=1, help="Web processes.")] = 1) -> None:
    """Migrate the database if needed, then serve the portal, the public and the admin API."""
    import uvicorn

    from gatepass.app import create_app
    from gatepass.auth import service as auth

    with opened() as core:
        if auth.count_api_keys(core) == 0:
            _, raw = auth.create_api_key(core, "bootstrap", ["admin"])
            typer.echo("Created the first admin API key (shown once; keep it safe):")
            typer.echo(f"  {raw}")
        typer.echo(f"Gatepass is serving at http://{host}:{port} "
                   f"(public URL {core.settings.public_url})")
        if core.settings.is_sqlite and workers > 1:
            typer.echo("Note: several workers on SQLite serialise their writes; use PostgreSQL "
                       "for more than one process.", err=True)
        settings = core.settings
    from gatepass import logs

    logs.configure(settings.log_level)
    # proxy_headers=False: whether X-Forwarded-For is believed is GATEPASS_TRUST_PROXY_HEADERS
    # alone (api.http.client_ip), not also uvicorn's own rule for proxies on 127.0.0.1.
    if workers == 1:
        application = create_app(settings)
        gc.freeze()  # what start-up built lives for good: keep it out of every collection
        uvicorn.run(application, host=host, port=port, log_config=None,
                    access_log=False, server_header=False, proxy_headers=False)
    else:
        uvicorn.run("gatepass.app:app_from_env", factory=True, host=host, port=port,
                    workers=workers, log_config=None, access_log=False, server_header=False,
                    proxy_headers=False)


@app.command()
def migrate() -> None:
    """Apply database migrations."""
    with opened() as core:
        typer.echo(f"The database at {core.settings.database_url} is up to date.")


# -- API keys -----------------------------------------------------------------------------------

@api_key_app.command("create")
def api_key_create(
        name: Annotated[str, typer.Option(help="What the key is for.")],
        scope: Annotated[list[str] | None, typer.Option(
            help="admin, users, invitations, webhooks, settings or read; repeatable.")] = None,
) -> None:
    """Print a new admin API key once, alone on the last line."""
    from gatepass.auth import service as auth

    with opened() as core:
        key, raw = auth.create_api_key(core, name, scope or ["admin"])
        typer.echo(f"API key '{key.name}' with scopes {', '.join(key.scopes)}:")
        typer.echo(raw)


# -- users --------------------------------------------------------------------------------------

# The password options `users create` and `users reset-password` share.
ChosenPassword = Annotated[str | None, typer.Option(help="A password you chose.")]
GeneratePassword = Annotated[bool, typer.Option("--generate-password",
                                                help="Generate a strong password.")]
SendPassword = Annotated[bool, typer.Option("--send-password",
                                            help="Mail the password, or a set-password link.")]

@users_app.command("create")
def users_create(
        email: Annotated[str | None, typer.Option(help="The user's email.")] = None,
        username: Annotated[str | None, typer.Option(help="Default: from the email.")] = None,
        password: ChosenPassword = None,
        generate_password: GeneratePassword = False,
        send_password: SendPassword = False,
        password_expired: Annotated[bool | None, typer.Option(
            "--password-expired/--no-password-expired",
            help="Force a change at first sign-in.")] = None,
        first_name: Annotated[str | None, typer.Option()] = None,
        last_name: Annotated[str | None, typer.Option()] = None,
        account: Annotated[str | None, typer.Option(help="Account id.")] = None,
        role: Annotated[list[str] | None, typer.Option(help="Role name; repeatable.")] = None,
) -> None:
    """Create a user, as POST /admin/api/v1/users."""
    from pydantic import ValidationError

    from gatepass.errors import validation_reason
    from gatepass.users import service as users
    from gatepass.users.schemas import UserCreate

    try:
        data = UserCreate(email=email, username=username, password=password,
                          generate_password=generate_password, send_password=send_password,
                          password_expired=password_expired, first_name=first_name,
                          last_name=last_name, account_id=account, roles=role or [])
    except ValidationError as exc:
        first = exc.errors()[0]
        option = f"--{first['loc'][0]}".replace("_", "-")
        raise fail(f"{option}: {validation_reason(first)}.") from None
    with opened() as core:
        created = users.create_user(core, CLI, data)
        typer.echo(json.dumps(users.user_public(created.user), indent=2))
        if created.password:
            typer.echo("Generated password (shown once):", err=True)
            typer.echo(created.password)


@users_app.command("reset-password")
def users_reset_password(
        user: Annotated[str, typer.Argument(metavar="USER_ID_OR_USERNAME",
                                            help="The user's id or username.")],
        password: ChosenPassword = None,
        generate_password: GeneratePassword = False,
        send_password: SendPassword = False,
        password_expired: Annotated[bool | None, typer.Option(
            "--password-expired/--no-password-expired",
            help="Force a change at next sign-in.")] = None,
) -> None:
    """Reset a user's password, as POST /admin/api/v1/users/{id}/reset-password."""
    from gatepass.accounts.service import user_id_of
    from gatepass.users import service as users
    from gatepass.users.schemas import PasswordReset

    data = PasswordReset(password=password, generate_password=generate_password,
                         send_password=send_password, password_expired=password_expired)
    with opened() as core:
        reset = users.admin_reset_password(core, CLI, user_id_of(core, user), data)
        typer.echo(json.dumps(users.user_public(reset.user), indent=2))
        if reset.password:
            typer.echo("Generated password (shown once):", err=True)
            typer.echo(reset.password)


# -- settings -----------------------------------------------------------------------------------

@settings_app.command("get")
def settings_get(key: Annotated[str | None, typer.Argument()] = None) -> None:
    """Show one site setting, or all of them."""
    from gatepass.sitesettings.service import DEFAULTS

    with opened() as core:
        values = core.site.all()
        if key is None:
            for name in sorted(values):
                typer.echo(f"{name} = {json.dumps(values[name])}")
            return
        if key not in DEFAULTS:
            raise fail(f"There is no setting called '{key}'.")
        typer.echo(json.dumps(values[key]))


@settings_app.command("set")
def settings_set(key: str, value: str) -> None:
    """Change a site setting (true/false, a number, or text)."""
    with opened() as core:
        parsed: Any = value
        with core.db.write() as session:
            changed = core.site.update(session, {key: parsed})
        typer.echo(f"{key} = {json.dumps(changed[key])}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
