from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from gatepass.db import Base, new_id, utcnow


class ExternalProvider(Base):
    """An OpenID Connect (or GitHub OAuth 2.0) identity provider."""

    __tablename__ = "external_providers"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(32))  # oidc | entra | b2c | google | github
    display_name: Mapped[str] = mapped_column(String(200))
    issuer: Mapped[str | None] = mapped_column(Text)
    client_id: Mapped[str] = mapped_column(String(500))
    client_secret: Mapped[str | None] = mapped_column(Text)  # encrypted with the secret key
    scopes: Mapped[str] = mapped_column(String(500), default="openid email profile")
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    enabled: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
