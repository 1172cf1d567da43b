"""Webhook signing secrets: made once, shown once, kept sealed (AES-GCM) at rest.

Unlike tokens and API keys, a signing secret cannot be stored as a hash: every delivery needs
the plaintext to compute its HMAC. So it is encrypted with a key derived from the process's
GATEPASS_SECRET_KEY; a database dump alone yields no usable secret.
"""

from __future__ import annotations

import base64
import os
import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX = "whsec_"
SECRET_BYTES = 32  # Standard Webhooks asks for 24 to 64 random bytes
_VERSION = "v1:"
_INFO = b"gatepass webhook secrets v1"


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _key(secret_key: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(
        secret_key.encode())


def seal(secret_key: str, plaintext: str) -> str:
    nonce = os.urandom(12)  # 96-bit nonce, as AES-GCM wants
    sealed = AESGCM(_key(secret_key)).encrypt(nonce, plaintext.encode(), _INFO)
    return _VERSION + base64.urlsafe_b64encode(nonce + sealed).decode()


def unseal(secret_key: str, stored: str) -> str:
    """The plaintext secret; ValueError when it was sealed under another key or is damaged."""
    if not stored.startswith(_VERSION):
        raise ValueError("the webhook secret is not in a known sealed format")
    raw = base64.urlsafe_b64decode(stored[len(_VERSION):])
    try:
        return AESGCM(_key(secret_key)).decrypt(raw[:12], raw[12:], _INFO).decode()
    except Exception as exc:  # InvalidTag: another GATEPASS_SECRET_KEY, or damage
        raise ValueError("the webhook secret cannot be unsealed with this secret key") from exc
