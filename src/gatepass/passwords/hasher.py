"""Password hashing: argon2id for everything Gatepass writes, legacy verifiers for imports.

Hashing runs in a thread pool with one thread per core: argon2 releases the GIL, so both
cores work, and requests that need no hash never queue behind one. Dedicated threads also keep
argon2's 19 MiB working memory warm in their own malloc arenas: hashing in the request threads
instead (one semaphore slot per core) measured 2-4 ms more CPU per sign-in at 64 clients.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import argon2
import bcrypt
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


@dataclass(frozen=True)
class Verification:
    ok: bool
    needs_rehash: bool = False


class PasswordHasher:
    def __init__(self, memory_kib: int = 19456, time_cost: int = 2, parallelism: int = 1,
                 threads: int = 0, observe: object | None = None) -> None:
        self._argon2 = argon2.PasswordHasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism,
            type=argon2.Type.ID)
        self.threads = threads or (os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="hash")
        self._observe = observe  # a callable taking seconds, for metrics
        self._dummy: str | None = None

    # -- in the calling thread -------------------------------------------------------------

    def hash_now(self, password: str) -> str:
        return self._timed(self._argon2.hash, password)

    def verify_now(self, stored: str | None, password: str) -> Verification:
        if stored is None:
            self._timed(self._verify_argon2, self.dummy_hash(), password)
            return Verification(False)
        return self._timed(self._verify, stored, password)

    # -- on the bounded pool (callers in request threads) ------------------------------------

    def hash(self, password: str) -> str:
        return self._pool.submit(self.hash_now, password).result()

    def verify(self, stored: str | None, password: str) -> Verification:
        """Verify against a stored hash; with None, burn the same time on a dummy hash."""
        return self._pool.submit(self.verify_now, stored, password).result()

    def dummy_hash(self) -> str:
        if self._dummy is None:
            self._dummy = self._argon2.hash(os.urandom(16).hex())
        return self._dummy

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- formats ---------------------------------------------------------------------------

    def _timed(self, fn, *args):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            if self._observe is not None:
                self._observe(time.perf_counter() - started)  # type: ignore[operator]

    def _verify(self, stored: str, password: str) -> Verification:
        if stored.startswith("$argon2"):
            return self._verify_argon2(stored, password)
        ok = verify_legacy(stored, password)
        return Verification(ok, needs_rehash=ok)

    def _verify_argon2(self, stored: str, password: str) -> Verification:
        try:
            self._argon2.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return Verification(False)
        return Verification(True, needs_rehash=self._argon2.check_needs_rehash(stored))


def verify_legacy(stored: str, password: str) -> bool:
    """bcrypt, Django pbkdf2_sha256, and ASP.NET Identity v2/v3 (Power Pages) hashes."""
    secret = password.encode()
    if stored.startswith(("$2a$", "$2b$", "$2y$")):
        candidate = "$2b$" + stored[4:] if stored.startswith("$2y$") else stored
        try:
            return bcrypt.checkpw(secret, candidate.encode())
        except ValueError:
            return False
    if stored.startswith("pbkdf2_sha256$"):
        try:
            _, iterations, salt, digest = stored.split("$", 3)
            derived = hashlib.pbkdf2_hmac("sha256", secret, salt.encode(), int(iterations))
        except ValueError:
            return False
        return hmac.compare_digest(base64.b64encode(derived).decode(), digest)
    if stored.startswith("aspnet:"):
        return verify_aspnet_identity(stored.removeprefix("aspnet:"), password)
    return False


_ASPNET_PRF = {0: "sha1", 1: "sha256", 2: "sha512"}


def verify_aspnet_identity(encoded: str, password: str) -> bool:
    """ASP.NET Identity PasswordHasher, v2 (0x00) and v3 (0x01) formats."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except ValueError:
        return False
    if len(raw) == 49 and raw[0] == 0x00:  # v2: PBKDF2-HMAC-SHA1, 1000 iterations
        salt, subkey = raw[1:17], raw[17:49]
        derived = hashlib.pbkdf2_hmac("sha1", password.encode(), salt, 1000, 32)
        return hmac.compare_digest(derived, subkey)
    if len(raw) >= 13 and raw[0] == 0x01:  # v3: prf, iterations, salt length (big-endian)
        prf = int.from_bytes(raw[1:5], "big")
        iterations = int.from_bytes(raw[5:9], "big")
        salt_length = int.from_bytes(raw[9:13], "big")
        if prf not in _ASPNET_PRF or salt_length < 16 or iterations < 1:
            return False
        salt = raw[13:13 + salt_length]
        subkey = raw[13 + salt_length:]
        if len(salt) != salt_length or len(subkey) < 16:
            return False
        derived = hashlib.pbkdf2_hmac(_ASPNET_PRF[prf], password.encode(), salt, iterations,
                                      len(subkey))
        return hmac.compare_digest(derived, subkey)
    return False
