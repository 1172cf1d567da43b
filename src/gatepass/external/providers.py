"""External identity providers: presets, the stored configuration, and its use cases.

A provider is a row in `external_providers`. Its client secret is stored encrypted with a key
derived from the secret key (AES-256-GCM), so a database dump alone yields no usable secret.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select

from gatepass.db import new_id, utcnow
from gatepass.errors import Conflict, GatepassError, InvalidInput, NotFound
from gatepass.external.models import ExternalProvider

if TYPE_CHECKING:
    from gatepass.core import Core

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
KINDS = ("oidc", "entra", "b2c", "google", "github")
GITHUB_ISSUER = "https://github.com"


class ProviderMisconfigured(GatepassError):
    code = "provider_misconfigured"
    message = "This sign-in provider is not set up correctly; tell the site's administrator."


@dataclass(frozen=True)
class Preset:
    """What a kind of provider fills in for you."""

    kind: str
    issuer: str | None  # a template with {tenant} and {policy}, or None (plain OAuth 2.0)
    scopes: str
    display_name: str
    needs: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "oidc": Preset("oidc", None, "openid email profile", "OpenID Connect"),
    "entra": Preset("entra", "https://login.microsoftonline.com/{tenant}/v2.0",
                    "openid email profile", "Microsoft", needs=("tenant",)),
    "b2c": Preset("b2c", "https://{tenant}.b2clogin.com/{tenant}.onmicrosoft.com/{policy}/v2.0",
                  "openid email profile", "Microsoft account", needs=("tenant", "policy"),
                  # B2C user flows put addresses in an `emails` array and assert no
                  # email_verified: the user flow itself verified them.
                  options={"email_claim": "emails", "email_verified_by_provider": True}),
    "google": Preset("google", "https://accounts.google.com", "openid email profile", "Google"),
    "github": Preset("github", None, "read:user user:email", "GitHub", options={
        "authorization_endpoint": "https://github.com/login/oauth/authorize",
        "token_endpoint": "https://github.com/login/oauth/access_token",
        "userinfo_endpoint": "https://api.github.com/user",
        "emails_endpoint": "https://api.github.com/user/emails",
    }),
}


# -- the client secret, encrypted at rest -------------------------------------------------------

def _cipher(secret_key: str) -> AESGCM:
    key = hashlib.sha256(b"gatepass:external-provider-secret:" + secret_key.encode()).digest()
    return AESGCM(key)


def encrypt_secret(secret_key: str, plaintext: str) -> str:
    nonce = os.urandom(12)  # 96 bits, fresh for every encryption
    sealed = _cipher(secret_key).encrypt(nonce, plaintext.encode(), b"client_secret")
    return "v1:" + base64.urlsafe_b64encode(nonce + sealed).decode()


def decrypt_secret(secret_key: str, stored: str | None) -> str | None:
    if not stored:
        return None
    try:
        raw = base64.urlsafe_b64decode(stored.removeprefix("v1:").encode())
        return _cipher(secret_key).decrypt(raw[:12], raw[12:], b"client_secret").decode()
    except (InvalidTag, ValueError):
        raise ProviderMisconfigured(
            "The provider's client secret cannot be read with this secret key; "
            "set it again with `gatepass providers add`.") from None


# -- configuration ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProviderConfig:
    """A provider as the sign-in flow needs it, secret decrypted."""

    id: str
    slug: str
    kind: str
    display_name: str
    issuer: str | None
    client_id: str
    client_secret: str | None
    scopes: str
    options: dict[str, Any]

    @property
    def is_oidc(self) -> bool:
        return self.kind != "github"

    @property
    def identity_issuer(self) -> str:
        """The issuer identities of this provider are keyed by."""
        return self.issuer or GITHUB_ISSUER

    @property
    def allow_email_mapping(self) -> bool:
        return bool(self.options.get("allow_contact_mapping_with_email"))


def provider_public(row: ExternalProvider) -> dict[str, Any]:
    """A provider for listings: never its secret."""
    return {"slug": row.slug, "kind": row.kind, "display_name": row.display_name,
            "issuer": row.issuer, "client_id": row.client_id, "scopes": row.scopes,
            "enabled": row.enabled, "secret_set": bool(row.client_secret),
            "allow_contact_mapping_with_email":
                bool((row.options or {}).get("allow_contact_mapping_with_email"))}


def issuer_for(preset: Preset, issuer: str | None, tenant: str | None,
               policy: str | None) -> str | None:
    if issuer:
        issuer = issuer.strip().rstrip("/")
        if not re.match(r"^https?://[^\s/]+", issuer):
            raise InvalidInput("The issuer must be an http(s) URL.", field="issuer")
        return issuer
    if preset.kind == "oidc":
        raise InvalidInput("A generic OpenID Connect provider needs --issuer.", field="issuer")
    if preset.issuer is None:
        return None
    values = {"tenant": tenant, "policy": policy}
    for need in preset.needs:
        value = values[need]
        if not value or not re.match(r"^[A-Za-z0-9._-]+$", value):
            raise InvalidInput(f"The {preset.kind} preset needs --{need} (letters, digits, "
                               f". _ - only).", field=need)
    return preset.issuer.format(tenant=tenant, policy=policy)


def add_provider(core: Core, slug: str, *, client_id: str, client_secret: str | None,
                 preset: str | None = None, issuer: str | None = None,
                 tenant: str | None = None, policy: str | None = None,
                 scopes: str | None = None, display_name: str | None = None,
                 allow_contact_mapping_with_email: bool = False,
                 replace: bool = True) -> ExternalProvider:
    """Add a provider, or replace the one with this slug (so a rotated secret can be set)."""
    slug = slug.strip().lower()
    if not SLUG_RE.match(slug):
        raise InvalidInput("A provider slug holds lowercase letters, digits, _ and - only "
                           "(at most 64).", field="slug")
    kind = (preset or "oidc").strip().lower()
    if kind not in PRESETS:
        raise InvalidInput(f"There is no preset called '{kind}'; use one of "
                           f"{', '.join(k for k in KINDS if k != 'oidc')}.", field="preset")
    chosen = PRESETS[kind]
    if not client_id or not client_id.strip():
        raise InvalidInput("A provider needs a client id.", field="client_id")
    resolved_issuer = issuer_for(chosen, issuer, tenant, policy)
    options: dict[str, Any] = dict(chosen.options)
    options["allow_contact_mapping_with_email"] = bool(allow_contact_mapping_with_email)
    with core.db.write() as session:
        row = session.scalar(select(ExternalProvider).where(ExternalProvider.slug == slug))
        if row is not None and not replace:
            raise Conflict(f"There already is a provider called '{slug}'.", field="slug")
        if row is None:
            row = ExternalProvider(id=new_id(), slug=slug, created_at=utcnow())
            session.add(row)
        row.kind = kind
        row.display_name = (display_name or "").strip() or chosen.display_name
        row.issuer = resolved_issuer
        row.client_id = client_id.strip()
        row.client_secret = encrypt_secret(core.secret_key, client_secret) \
            if client_secret else None
        row.scopes = " ".join((scopes or chosen.scopes).replace(",", " ").split())
        row.options = options
        row.enabled = True
        session.flush()
        return row


def list_providers(core: Core, *, enabled_only: bool = False) -> list[ExternalProvider]:
    with core.db.read() as session:
        query = select(ExternalProvider).order_by(ExternalProvider.display_name,
                                                  ExternalProvider.slug)
        if enabled_only:
            query = query.where(ExternalProvider.enabled.is_(True))
        return list(session.scalars(query))


def remove_provider(core: Core, slug: str) -> None:
    """Remove a provider. Identities already linked stay (keyed by issuer and subject)."""
    with core.db.write() as session:
        row = session.scalar(select(ExternalProvider).where(ExternalProvider.slug == slug))
        if row is None:
            raise NotFound(f"There is no provider called '{slug}'.")
        session.delete(row)


def load(core: Core, slug: str) -> ProviderConfig:
    """An enabled provider by slug; unknown and disabled ones answer the same."""
    with core.db.read() as session:
        row = session.scalar(select(ExternalProvider).where(ExternalProvider.slug == slug))
    if row is None or not row.enabled:
        raise NotFound("There is no such sign-in provider.")
    return ProviderConfig(id=row.id, slug=row.slug, kind=row.kind,
                          display_name=row.display_name, issuer=row.issuer,
                          client_id=row.client_id,
                          client_secret=decrypt_secret(core.secret_key, row.client_secret),
                          scopes=row.scopes, options=dict(row.options or {}))
