"""The relying-party side of OpenID Connect (and GitHub's OAuth 2.0), with Authlib.

Authorization code flow with PKCE (S256), `state` and `nonce`; the ID token's signature is
checked against the provider's JWKS and its `iss`, `aud`, `exp` and `nonce` against what we
expect. Nothing here touches the database: the service decides what a verified identity means.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import httpx
from authlib.integrations.base_client import OAuthError
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from gatepass.errors import GatepassError
from gatepass.external.providers import ProviderConfig

with warnings.catch_warnings():  # Authlib nags about `httpx` versus `httpx2`; both work.
    warnings.simplefilter("ignore", DeprecationWarning)
    from authlib.integrations.httpx_client import OAuth2Client

log = logging.getLogger("gatepass.external")

HTTP_TIMEOUT = 10.0  # seconds, for every call to a provider
DISCOVERY_TTL = 3600.0  # seconds
LEEWAY = 120  # seconds of clock skew allowed on exp / iat
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]


class ExternalLoginFailed(GatepassError):
    code = "external_login_failed"
    message = "Sign-in with the provider did not work. Start again from the sign-in page."


@dataclass(frozen=True)
class Identity:
    """What a provider vouched for, after every check passed."""

    issuer: str
    subject: str
    email: str | None
    email_verified: bool
    given_name: str | None
    family_name: str | None
    preferred_username: str | None


# -- discovery and keys, cached per process -----------------------------------------------------

_cache: dict[str, tuple[float, dict[str, Any]]] = {}
_cache_lock = threading.Lock()


def _get_json(url: str, **kwargs: Any) -> Any:
    try:
        response = httpx.get(url, timeout=HTTP_TIMEOUT, follow_redirects=False, **kwargs)
        response.raise_for_status()
        return response.json()
    except (httpx.HTTPError, ValueError) as exc:
        log.warning("provider request failed", extra={"url": url, "error": type(exc).__name__})
        raise ExternalLoginFailed("The sign-in provider could not be reached. "
                                  "Try again in a moment.") from None


def _cached(url: str, *, refresh: bool = False) -> dict[str, Any]:
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(url)
    if hit is not None and not refresh and now - hit[0] < DISCOVERY_TTL:
        return hit[1]
    value = _get_json(url)
    if not isinstance(value, dict):
        raise ExternalLoginFailed("The sign-in provider answered with something unexpected.")
    with _cache_lock:
        _cache[url] = (now, value)
    return value


def metadata(provider: ProviderConfig) -> dict[str, Any]:
    """The provider's endpoints: discovered for OIDC, from the preset for GitHub."""
    if not provider.is_oidc:
        return {key: provider.options[key] for key in (
            "authorization_endpoint", "token_endpoint", "userinfo_endpoint", "emails_endpoint")}
    if not provider.issuer:
        raise ExternalLoginFailed("This sign-in provider has no issuer configured.")
    found = _cached(provider.issuer + "/.well-known/openid-configuration")
    for key in ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri"):
        if not isinstance(found.get(key), str):
            raise ExternalLoginFailed("The sign-in provider's discovery document lacks "
                                      f"'{key}'.")
    return found


def _client(provider: ProviderConfig, meta: dict[str, Any], redirect_uri: str) -> OAuth2Client:
    methods = meta.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
    if not provider.client_secret:
        method = "none"
    elif "client_secret_basic" in methods:
        method = "client_secret_basic"
    else:
        method = "client_secret_post"
    return OAuth2Client(client_id=provider.client_id, client_secret=provider.client_secret,
                        scope=provider.scopes, redirect_uri=redirect_uri,
                        code_challenge_method="S256", token_endpoint_auth_method=method,
                        timeout=HTTP_TIMEOUT)


def authorization_url(provider: ProviderConfig, redirect_uri: str, *, state: str, nonce: str,
                      code_verifier: str) -> str:
    meta = metadata(provider)
    extra: dict[str, Any] = {"nonce": nonce} if provider.is_oidc else {}
    with _client(provider, meta, redirect_uri) as client:
        url, _ = client.create_authorization_url(meta["authorization_endpoint"], state=state,
                                                 code_verifier=code_verifier, **extra)
    return str(url)


# -- the callback -------------------------------------------------------------------------------

def complete(provider: ProviderConfig, redirect_uri: str, *, code: str, nonce: str,
             code_verifier: str) -> Identity:
    """Exchange the code, verify what comes back, and say who signed in."""
    meta = metadata(provider)
    with _client(provider, meta, redirect_uri) as client:
        try:
            token = client.fetch_token(meta["token_endpoint"], grant_type="authorization_code",
                                       code=code, code_verifier=code_verifier,
                                       headers={"Accept": "application/json"})
        except OAuthError as exc:
            log.warning("token exchange refused", extra={"provider": provider.slug,
                                                         "error": exc.error})
            raise ExternalLoginFailed(
                "The provider refused this sign-in (the code was already used, has expired "
                "or was not meant for us). Start again from the sign-in page.") from None
        except httpx.HTTPError:
            raise ExternalLoginFailed("The sign-in provider could not be reached. "
                                      "Try again in a moment.") from None
        if provider.is_oidc:
            return _from_id_token(provider, meta, token, nonce)
        return _from_github(provider, meta, client, token)


def _keys(meta: dict[str, Any], *, refresh: bool = False) -> KeySet:
    try:
        return KeySet.import_key_set(_cached(meta["jwks_uri"], refresh=refresh))  # type: ignore
    except (JoseError, ValueError, KeyError, TypeError):
        raise ExternalLoginFailed("The sign-in provider's signing keys cannot be read.") from None


def _expected_issuer(provider: ProviderConfig, meta: dict[str, Any], claims: dict[str, Any]) -> str:
    issuer = str(meta["issuer"])
    # Entra ID's multi-tenant endpoints (common, organizations) name the issuer with a
    # placeholder; the token's own tenant (tid) fills it.
    if "{tenantid}" in issuer and isinstance(claims.get("tid"), str):
        issuer = issuer.replace("{tenantid}", claims["tid"])
    return issuer


def _from_id_token(provider: ProviderConfig, meta: dict[str, Any], token: dict[str, Any],
                   nonce: str) -> Identity:
    raw = token.get("id_token")
    if not isinstance(raw, str):
        raise ExternalLoginFailed("The provider sent no ID token.")
    try:
        try:
            decoded = jwt.decode(raw, _keys(meta), algorithms=ALGORITHMS)
        except JoseError:  # perhaps the provider rotated its keys since we cached them
            decoded = jwt.decode(raw, _keys(meta, refresh=True), algorithms=ALGORITHMS)
    except (JoseError, ValueError):
        raise ExternalLoginFailed("The provider's ID token has no valid signature.") from None
    claims = dict(decoded.claims)
    registry = jwt.JWTClaimsRegistry(
        leeway=LEEWAY,
        iss={"essential": True, "value": _expected_issuer(provider, meta, claims)},
        aud={"essential": True, "value": provider.client_id},
        sub={"essential": True},
        exp={"essential": True},
    )
    try:
        registry.validate(claims)
    except JoseError as exc:
        claim = getattr(exc, "claim", None) or str(exc)
        raise ExternalLoginFailed(_claim_message(str(claim))) from None
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    if len(audiences) > 1 and claims.get("azp") != provider.client_id:
        raise ExternalLoginFailed(_claim_message("aud"))
    got_nonce = claims.get("nonce")
    if not isinstance(got_nonce, str) or not hmac.compare_digest(got_nonce, nonce):
        raise ExternalLoginFailed(_claim_message("nonce"))
    if "email" not in claims and meta.get("userinfo_endpoint") and token.get("access_token"):
        claims = {**_userinfo(meta["userinfo_endpoint"], token["access_token"], claims["sub"]),
                  **claims}
    email, verified = _email_of(provider, claims)
    return Identity(issuer=str(claims["iss"]), subject=str(claims["sub"]), email=email,
                    email_verified=verified, given_name=_text(claims.get("given_name")),
                    family_name=_text(claims.get("family_name")),
                    preferred_username=_text(claims.get("preferred_username")))


def _claim_message(claim: str) -> str:
    what = {"iss": "was issued by someone else", "aud": "was meant for another application",
            "exp": "has expired", "nonce": "does not belong to this sign-in",
            "sub": "names nobody"}.get(claim.split(",")[0].strip("'\" "), "is not valid")
    return f"The provider's ID token {what}, so we refused it. Start again from the sign-in page."


def _userinfo(url: str, access_token: str, subject: str) -> dict[str, Any]:
    info = _get_json(url, headers={"Authorization": f"Bearer {access_token}"})
    if not isinstance(info, dict) or info.get("sub") != subject:
        return {}  # OIDC core 5.3.2: a userinfo for someone else is ignored
    return {key: info[key] for key in ("email", "email_verified", "given_name", "family_name",
                                       "preferred_username") if key in info}


def _email_of(provider: ProviderConfig, claims: dict[str, Any]) -> tuple[str | None, bool]:
    name = provider.options.get("email_claim") or "email"
    value = claims.get(name, claims.get("email"))
    if isinstance(value, list):
        value = value[0] if value else None
    email = _text(value)
    if email is None or "@" not in email:
        return None, False
    verified = claims.get("email_verified")
    if isinstance(verified, str):  # some providers send "true"
        verified = verified.lower() == "true"
    if verified is None and provider.options.get("email_verified_by_provider"):
        verified = True
    return email, verified is True


def _text(value: Any) -> str | None:
    return value.strip()[:320] or None if isinstance(value, str) else None


def _from_github(provider: ProviderConfig, meta: dict[str, Any], client: OAuth2Client,
                 token: dict[str, Any]) -> Identity:
    try:
        user = client.get(meta["userinfo_endpoint"]).json()
        emails = client.get(meta["emails_endpoint"]).json()
    except (httpx.HTTPError, ValueError):
        raise ExternalLoginFailed("GitHub could not be reached. Try again in a moment.") from None
    if not isinstance(user, dict) or not isinstance(user.get("id"), int):
        raise ExternalLoginFailed("GitHub did not say who signed in.")
    primary = next((e for e in emails if isinstance(e, dict) and e.get("primary")), None) \
        if isinstance(emails, list) else None
    name = _text(user.get("name")) or ""
    first, _, last = name.partition(" ")
    return Identity(issuer=provider.identity_issuer, subject=str(user["id"]),
                    email=_text(primary.get("email")) if primary else None,
                    email_verified=bool(primary and primary.get("verified") is True),
                    given_name=first or None, family_name=last or None,
                    preferred_username=_text(user.get("login")))
