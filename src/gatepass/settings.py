"""Process configuration from the environment (CONTRACT §1).

Site settings that an admin changes at run time live in the database
(`gatepass.site_settings`); this module holds only what a process needs to start.
"""

from __future__ import annotations

import os
import secrets
from email.utils import parseaddr
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(Exception):
    """A configuration value is unusable; the message is one sentence naming the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEPASS_", extra="ignore")

    database_url: str = "sqlite:///./var/gatepass.db"
    public_url: str = "http://127.0.0.1:8000"
    secret_key: str | None = None
    smtp_url: str | None = None
    mail_from: str = "Gatepass <no-reply@localhost>"
    redis_url: str | None = None
    worker: Literal["inline", "external"] = "inline"

    # Extensions beyond the contract, documented in docs/operator-guide.md.
    var_dir: Path = Path("./var")
    mail_templates_dir: Path | None = None
    argon2_memory_kib: int = Field(default=19456, ge=8)  # OWASP: 19 MiB
    argon2_time_cost: int = Field(default=2, ge=1)
    argon2_parallelism: int = Field(default=1, ge=1)
    hash_threads: int = Field(default=0, ge=0)  # 0 = one per core
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    trust_proxy_headers: bool = False  # take the client address from X-Forwarded-For
    # Outbox delivery (docs/operator-guide.md, "Mail").
    outbox_concurrency: int = Field(default=64, ge=1)  # deliveries in flight per process
    outbox_lease_seconds: float = Field(default=120, gt=0)  # a killed worker's claims return then
    outbox_retry_base_seconds: float = Field(default=10, gt=0)  # first retry; doubles, 6 h cap
    outbox_max_attempts: int = Field(default=15, ge=1)  # ≈ 1 day of retries, then dead
    outbox_poll_seconds: float = Field(default=0.25, gt=0)  # idle wait between claims
    outbox_run_size: int = Field(default=100, ge=1)  # messages to one endpoint per claim, in order
    smtp_connections: int = Field(default=4, ge=1)  # per process, reused across messages
    smtp_timeout_seconds: float = Field(default=30, gt=0)

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an absolute http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if not (value.startswith("sqlite") or value.startswith("postgresql")):
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        if value.startswith("postgresql://"):
            value = "postgresql+psycopg://" + value.removeprefix("postgresql://")
        return value

    @field_validator("smtp_url")
    @classmethod
    def _smtp_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError("must look like smtp://user:pass@host:port or smtps://host:port")
        try:
            parts.port
        except ValueError as exc:
            raise ValueError("has a port that is not a number") from exc
        return value

    @field_validator("mail_from")
    @classmethod
    def _mail_from(cls, value: str) -> str:
        _, address = parseaddr(value)
        if "@" not in address:
            raise ValueError("must be an address such as 'Portal <no-reply@example.com>'")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis:// URL")
        return value

    @property
    def secure_cookies(self) -> bool:
        return self.public_url.startswith("https://")

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def resolved_secret_key(self) -> str:
        """The configured key, or one generated once into var/secret.key."""
        if self.secret_key:
            return self.secret_key
        path = self.var_dir / "secret.key"
        if path.exists():
            return path.read_text().strip()
        self.var_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(48)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key)
        try:
            os.link(tmp, path)  # atomic: a second process that raced us keeps the first key
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        return path.read_text().strip()


def load_settings(**overrides: object) -> Settings:
    """Read the environment; a bad value becomes one ConfigError sentence naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        error = exc.errors()[0]
        name = "GATEPASS_" + str(error["loc"][0]).upper() if error["loc"] else "GATEPASS_*"
        message = str(error["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{name} {message} (got {error.get('input')!r}).") from None
