"""Inputs of the user use cases: shared by the admin API, the public API, pages and the CLI."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, EmailStr, Field


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: EmailStr | None = None
    username: str | None = Field(default=None, min_length=1, max_length=150)
    first_name: str | None = Field(default=None, max_length=150)
    last_name: str | None = Field(default=None, max_length=150)
    phone: str | None = Field(default=None, max_length=50)
    account_id: str | None = None
    roles: list[str] = Field(default_factory=list)
    attributes: dict[str, Any] = Field(default_factory=dict)
    password: str | None = None
    generate_password: bool = False
    send_password: bool = False
    password_expired: bool | None = None
    login_enabled: bool = True
    lockout_enabled: bool = True
    email_verified: bool | None = None


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: EmailStr | None = None
    username: str | None = Field(default=None, min_length=1, max_length=150)
    first_name: str | None = Field(default=None, max_length=150)
    last_name: str | None = Field(default=None, max_length=150)
    phone: str | None = Field(default=None, max_length=50)
    account_id: str | None = None
    roles: list[str] | None = None
    attributes: dict[str, Any] | None = None
    login_enabled: bool | None = None
    lockout_enabled: bool | None = None
    email_verified: bool | None = None
    password_expired: bool | None = None


class ProfileUpdate(BaseModel):
    """What users may change about themselves."""

    model_config = ConfigDict(extra="forbid")

    first_name: str | None = Field(default=None, max_length=150)
    last_name: str | None = Field(default=None, max_length=150)
    phone: str | None = Field(default=None, max_length=50)


class PasswordReset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    password: str | None = None
    generate_password: bool = False
    send_password: bool = False
    password_expired: bool | None = None
