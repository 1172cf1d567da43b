"""The application core shared by the web app, the CLI and the worker: nothing HTTP here."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from gatepass.db import Database
from gatepass.metrics import Metrics
from gatepass.passwords.hasher import PasswordHasher
from gatepass.settings import Settings
from gatepass.sitesettings.service import SiteSettings


@dataclass
class Core:
    settings: Settings
    db: Database
    site: SiteSettings
    hasher: PasswordHasher
    metrics: Metrics
    secret_key: str
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("gatepass"))

    def link(self, path: str) -> str:
        """Every link in every message starts with GATEPASS_PUBLIC_URL, never a request's Host."""
        return self.settings.public_url + path

    def close(self) -> None:
        self.hasher.shutdown()
        self.db.dispose()


def build_core(settings: Settings) -> Core:
    metrics = Metrics()
    db = Database(settings.database_url)
    hasher = PasswordHasher(
        memory_kib=settings.argon2_memory_kib, time_cost=settings.argon2_time_cost,
        parallelism=settings.argon2_parallelism, threads=settings.hash_threads,
        observe=metrics.password_hash_seconds.observe)
    return Core(settings=settings, db=db, site=SiteSettings(db), hasher=hasher, metrics=metrics,
                secret_key=settings.resolved_secret_key())
