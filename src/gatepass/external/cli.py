"""`gatepass providers add|list|remove`: the external sign-in providers."""

from __future__ import annotations

import json
from typing import Annotated

import typer

providers_app = typer.Typer(no_args_is_help=True,
                            help="External sign-in providers (OpenID Connect, GitHub).")


@providers_app.command("add")
def providers_add(
        slug: Annotated[str, typer.Argument(help="Short name, used in the redirect URI.")],
        client_id: Annotated[str, typer.Option("--client-id", help="The client (application) id.")],
        client_secret: Annotated[str | None, typer.Option(
            "--client-secret", help="The client secret; stored encrypted.")] = None,
        issuer: Annotated[str | None, typer.Option(
            help="Issuer URL (discovery at ISSUER/.well-known/openid-configuration).")] = None,
        preset: Annotated[str | None, typer.Option(
            help="entra, b2c, google or github: fills issuer, scopes and claims.")] = None,
        tenant: Annotated[str | None, typer.Option(
            help="Entra ID tenant id or domain; B2C tenant name.")] = None,
        policy: Annotated[str | None, typer.Option(help="B2C user flow, e.g. B2C_1_signupsignin.")]
        = None,
        scopes: Annotated[str | None, typer.Option(help="Space-separated scopes.")] = None,
        display_name: Annotated[str | None, typer.Option(
            "--display-name", help="The button's label.")] = None,
        allow_contact_mapping_with_email: Annotated[bool, typer.Option(
            "--allow-contact-mapping-with-email",
            help="Link to an existing user with the same verified email.")] = False,
) -> None:
    """Add a provider, or replace the one with this slug; prints the redirect URI to register."""
    from gatepass.cli import opened
    from gatepass.external import providers, service

    with opened() as core:
        row = providers.add_provider(
            core, slug, client_id=client_id, client_secret=client_secret, preset=preset,
            issuer=issuer, tenant=tenant, policy=policy, scopes=scopes,
            display_name=display_name,
            allow_contact_mapping_with_email=allow_contact_mapping_with_email)
        typer.echo(f"Provider '{row.slug}' ({row.display_name}) is ready.")
        typer.echo("Register this redirect URI at the provider:")
        typer.echo(service.redirect_uri(core, row.slug))


@providers_app.command("list")
def providers_list(
        as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
) -> None:
    """Show the providers (never their secrets)."""
    from gatepass.cli import opened
    from gatepass.external import providers

    with opened() as core:
        rows = providers.list_providers(core)
        if not rows and not as_json:
            typer.echo("No providers yet; add one with `gatepass providers add`.")
        for row in rows:
            public = providers.provider_public(row)
            if as_json:
                typer.echo(json.dumps(public))
            else:
                state = "" if row.enabled else "\t(disabled)"
                typer.echo(f"{row.slug}\t{row.kind}\t{row.display_name}\t"
                           f"{row.issuer or '-'}\t{row.client_id}{state}")


@providers_app.command("remove")
def providers_remove(slug: Annotated[str, typer.Argument()]) -> None:
    """Remove a provider. Users keep their linked identities."""
    from gatepass.cli import opened
    from gatepass.external import providers

    with opened() as core:
        providers.remove_provider(core, slug)
        typer.echo(f"Provider '{slug}' removed.")
