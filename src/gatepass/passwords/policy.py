"""Password policy (NIST 800-63B): length and a list of common passwords, no composition rules."""

from __future__ import annotations

import gzip
import secrets
from functools import lru_cache
from importlib import resources

from gatepass.errors import WeakPassword

MAX_LENGTH = 1024  # accepted verbatim up to here; longer is refused, never truncated

# No look-alikes: no 0/O/o, 1/l/I, 5/S, 2/Z.
GENERATOR_ALPHABET = "ABCDEFGHJKMNPQRTUVWXYabcdefghijkmnpqrstuvwxyz346789"


@lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    """Django's list of 20,000 common passwords (django/contrib/auth/common-passwords.txt.gz,
    BSD licence; itself from Royce Williams' list), lower-cased."""
    data = resources.files("gatepass.passwords").joinpath("common-passwords.txt.gz").read_bytes()
    return frozenset(gzip.decompress(data).decode().split())


def check(password: str, *, min_length: int, check_common: bool,
          user_inputs: tuple[str | None, ...] = ()) -> None:
    if not isinstance(password, str) or len(password) < min_length:
        raise WeakPassword(f"Use at least {min_length} characters.", field="password")
    if len(password) > MAX_LENGTH:
        raise WeakPassword(f"Use at most {MAX_LENGTH} characters.", field="password")
    if check_common:
        if password.lower().strip() in common_passwords():
            raise WeakPassword("This password is too common; choose another.", field="password")
        lowered = password.casefold()
        for value in user_inputs:
            if value and len(value) >= 3 and lowered == value.casefold():
                raise WeakPassword("The password must not be your username or email.",
                                   field="password")


def generate(length: int, *, min_length: int = 8) -> str:
    """A CSPRNG password from an alphabet without look-alikes, always passing the policy."""
    length = max(length, min_length)
    while True:
        password = "".join(secrets.choice(GENERATOR_ALPHABET) for _ in range(length))
        try:
            check(password, min_length=min_length, check_common=True)
        except WeakPassword:
            continue
        return password
