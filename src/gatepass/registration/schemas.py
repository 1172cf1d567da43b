"""Inputs of self-service registration and email verification (public API and pages)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, EmailStr, Field


class Registration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: EmailStr
    username: str | None = Field(default=None, min_length=1, max_length=150)
    password: str = Field(max_length=4096)
    first_name: str | None = Field(default=None, max_length=150)
    last_name: str | None = Field(default=None, max_length=150)
    invitation_code: str | None = Field(default=None, max_length=200)


class TokenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(max_length=200)


class LoginBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    login: str = Field(min_length=1, max_length=320)
