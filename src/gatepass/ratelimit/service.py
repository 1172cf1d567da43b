"""Request rate limits per client address and per target login or email (`limits` library).

In memory by default (one process); in Redis when GATEPASS_REDIS_URL is set, so every process
of a deployment shares the counts. Lockout after failed sign-ins is separate (in the database)
and stays on whatever `ratelimit.enabled` says. The figures and their reasons are in
docs/security.md.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage, RedisStorage, Storage
from limits.strategies import MovingWindowRateLimiter

from gatepass.auth import tokens
from gatepass.errors import RateLimited

if TYPE_CHECKING:
    from gatepass.core import Core

log = logging.getLogger("gatepass.ratelimit")

REDIS_PREFIX = "gatepass-ratelimit"


@dataclass(frozen=True)
class Rule:
    per_ip: tuple[RateLimitItem, ...]
    per_target: tuple[RateLimitItem, ...]


def _rule(per_ip: str, per_target: str) -> Rule:
    return Rule(tuple(parse_many(per_ip)), tuple(parse_many(per_target)))


# Per-IP limits are generous (many people share an office or carrier NAT address); per-target
# limits are tighter: they stop mail bombing one address and password spraying at one login.
RULES: dict[str, Rule] = {
    "signin": _rule("300/minute;3000/hour", "60/minute;600/hour"),
    "register": _rule("60/minute;600/hour", "10/hour"),
    "forgot": _rule("60/minute;600/hour", "5/minute;20/hour"),
    "verify_resend": _rule("60/minute;600/hour", "3/minute;10/hour"),
}


class Limiter:
    def __init__(self, redis_url: str | None, secret_key: str) -> None:
        storage: Storage
        if redis_url:
            storage = RedisStorage(redis_url, key_prefix=REDIS_PREFIX)
        else:
            storage = MemoryStorage()
        self.storage = storage
        self.strategy = MovingWindowRateLimiter(storage)
        self._secret_key = secret_key

    def hit(self, action: str, *, ip: str | None, target: str | None) -> None:
        """Count one request; raise RateLimited (with seconds to wait) once a limit is reached."""
        rule = RULES[action]
        checks: list[tuple[RateLimitItem, str]] = []
        checks += [(item, "ip:" + (ip or "unknown")) for item in rule.per_ip]
        if target:
            # A keyed hash: Redis never holds an email address or username in plaintext.
            key = tokens.keyed_digest(self._secret_key, "target:" + target.strip().casefold())
            checks += [(item, "target:" + key[:32]) for item in rule.per_target]
        try:
            for item, identity in checks:
                if not self.strategy.hit(item, action, identity):
                    stats = self.strategy.get_window_stats(item, action, identity)
                    raise RateLimited(max(1, math.ceil(stats.reset_time - time.time())))
        except RateLimited:
            raise
        except Exception as exc:  # Redis down: serve rather than refuse everyone (fail open)
            log.warning("rate limit storage unavailable", extra={"error": type(exc).__name__})

    def reset(self) -> None:
        self.storage.reset()


_lock = threading.Lock()


def limiter_for(core: Core) -> Limiter:
    """One limiter per core (per process), built on first use."""
    limiter = core.__dict__.get("_limiter")
    if limiter is None:
        with _lock:
            limiter = core.__dict__.get("_limiter")
            if limiter is None:
                limiter = Limiter(core.settings.redis_url, core.secret_key)
                core.__dict__["_limiter"] = limiter
    return limiter  # type: ignore[no-any-return]


def check(core: Core, action: str, *, ip: str | None, target: str | None = None) -> None:
    """Raise RateLimited when `action` from `ip` (or at `target`) is over its limit."""
    if not core.site["ratelimit.enabled"]:
        return
    limiter_for(core).hit(action, ip=ip, target=target)
