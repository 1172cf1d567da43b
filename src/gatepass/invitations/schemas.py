"""Inputs of the invitation use cases: shared by the admin API and the CLI."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, EmailStr, Field


class Invitee(BaseModel):
    """One row of a bulk invitation (a CSV line, or an item of `invitees`)."""

    model_config = ConfigDict(extra="forbid")

    email: EmailStr
    first_name: str | None = Field(default=None, max_length=150)
    last_name: str | None = Field(default=None, max_length=150)
    account_id: str | None = Field(default=None, max_length=255)  # an id or an account name
    roles: list[str] | None = None  # added to the invitation's roles


class InvitationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["single", "group"] = "single"
    emails: list[EmailStr] = Field(default_factory=list, max_length=100_000)
    user_ids: list[str] = Field(default_factory=list, max_length=100_000)
    invitees: list[Invitee] = Field(default_factory=list, max_length=100_000)
    max_redemptions: int | None = Field(default=None, ge=1)
    expires_at: datetime | None = None
    inviter_id: str | None = None
    account_id: str | None = None
    roles: list[str] = Field(default_factory=list)
    send_email: bool = True
    on_redeem_email: bool = False


class RedeemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(min_length=1, max_length=200)
