"""Delivery of outbox rows of kind "mail": SMTP (aiosmtplib), or `.eml` files with no SMTP URL.

`GATEPASS_SMTP_URL`: `smtp://user:pass@host:port` (plain, or `?starttls=1`), `smtps://…`
(implicit TLS). Connections are kept open and reused, at most `GATEPASS_SMTP_CONNECTIONS` per
process. The sender is always `GATEPASS_MAIL_FROM`.

Outcomes: accepted → sent; a 5xx reply to the recipient or to the message → dead at once (the
server will never take it); anything else (refused connection, timeout, 4xx, a rejected
login or sender, which an operator can fix) → retry with backoff.
"""

from __future__ import annotations

import asyncio
import binascii
import os
import secrets
import ssl
from email.header import Header
from email.utils import format_datetime, formataddr, parseaddr
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib

from gatepass.db import utcnow
from gatepass.outbox.kinds import Claimed, Outcome, register

if TYPE_CHECKING:
    from gatepass.core import Core

TRUE = ("1", "true", "yes", "on")


def _qp(text: str) -> bytes:
    body = text.replace("\r\n", "\n").encode("utf-8")
    return binascii.b2a_qp(body, istext=True).replace(b"\n", b"\r\n")


def _header(value: str) -> str:
    value = " ".join(value.split())  # no header injection through a line break
    return value if value.isascii() else Header(value, "utf-8").encode()


def build_message(message: Claimed, mail_from: str) -> bytes:
    """multipart/alternative (text, then HTML) from exactly GATEPASS_MAIL_FROM, as bytes.

    Written out directly (quoted-printable UTF-8 parts, RFC 2047 headers where needed): the
    `email` package's generators cost milliseconds a message, which bounded throughput.
    The Message-ID derives from the outbox id, so a repeated delivery is recognisably the same.
    """
    payload = message.payload
    name, address = parseaddr(mail_from)
    domain = address.rpartition("@")[2] or "localhost"
    sender = formataddr((name, address), charset="utf-8") if name else address
    to = " ".join(str(payload["to"]).split())  # raw UTF-8 if need be (RFC 6532, SMTPUTF8)
    head = (f"From: {_header(sender)}\r\nTo: {to}\r\n"
            f"Subject: {_header(payload['subject'])}\r\nDate: {format_datetime(utcnow())}\r\n"
            f"Message-ID: <{message.id}@{domain}>\r\nAuto-Submitted: auto-generated\r\n"
            "MIME-Version: 1.0\r\n").encode("utf-8")
    parts = [("plain", payload.get("text") or "")]
    if payload.get("html"):
        parts.append(("html", payload["html"]))
    if len(parts) == 1:
        return head + _part(parts[0][0]) + _qp(parts[0][1])
    boundary = f"=_{secrets.token_hex(12)}".encode("ascii")
    out = [head, b'Content-Type: multipart/alternative; boundary="' + boundary + b'"\r\n\r\n']
    for subtype, body in parts:
        out += [b"--", boundary, b"\r\n", _part(subtype), _qp(body), b"\r\n"]
    out += [b"--", boundary, b"--\r\n"]
    return b"".join(out)


def _part(subtype: str) -> bytes:
    return (f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
            "Content-Transfer-Encoding: quoted-printable\r\n\r\n").encode("ascii")


class SmtpDeliverer:
    def __init__(self, core: Core) -> None:
        settings = core.settings
        url = urlsplit(settings.smtp_url or "")
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        self.hostname = url.hostname or "localhost"
        self.implicit_tls = url.scheme == "smtps"
        self.port = url.port or (465 if self.implicit_tls else 25)
        self.starttls = query.get("starttls", "").lower() in TRUE
        self.username = unquote(url.username) if url.username else None
        self.password = unquote(url.password) if url.password else None
        self.timeout = settings.smtp_timeout_seconds
        self.mail_from = settings.mail_from
        self.envelope_from = parseaddr(settings.mail_from)[1]
        self.size = settings.smtp_connections
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots: asyncio.Semaphore | None = None

    async def _connect(self) -> aiosmtplib.SMTP:
        tls_context = ssl.create_default_context() if (self.implicit_tls or self.starttls) else None
        client = aiosmtplib.SMTP(
            hostname=self.hostname, port=self.port, timeout=self.timeout,
            use_tls=self.implicit_tls, start_tls=self.starttls if not self.implicit_tls else False,
            tls_context=tls_context)
        await client.connect()
        if self.username:
            await client.login(self.username, self.password or "")
        return client

    async def deliver(self, message: Claimed) -> Outcome:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        try:
            email = build_message(message, self.mail_from)
        except (KeyError, ValueError, TypeError) as exc:
            return Outcome("dead", detail=f"The message cannot be built: {exc}")
        async with self._slots:
            client = self._idle.pop() if self._idle else None
            keep = False
            try:
                if client is None or not client.is_connected:
                    client = await self._connect()
                to = message.payload["to"]
                _, reply = await client.sendmail(
                    self.envelope_from, [to], email,
                    mail_options=[] if to.isascii() else ["SMTPUTF8"])
                keep = True
                return Outcome("sent", detail=reply[:500], status_code=250)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                keep = True
                refused = exc.recipients[0]
                status = "dead" if refused.code >= 500 else "retry"
                return Outcome(status, detail=f"{refused.code} {refused.message}"[:500],
                               status_code=refused.code)
            except aiosmtplib.SMTPDataError as exc:
                keep = True
                status = "dead" if exc.code >= 500 else "retry"
                return Outcome(status, detail=f"{exc.code} {exc.message}"[:500],
                               status_code=exc.code)
            except aiosmtplib.SMTPNotSupported:
                keep = True
                return Outcome("dead", detail="The SMTP server cannot deliver to an address "
                               "with non-ASCII characters (no SMTPUTF8).")
            except aiosmtplib.SMTPResponseException as exc:  # sender, login, or a 4xx anywhere
                return Outcome("retry", detail=f"{exc.code} {exc.message}"[:500],
                               status_code=exc.code)
            except ValueError as exc:  # an address SMTP cannot carry
                keep = client is not None and client.is_connected
                return Outcome("dead", detail=f"The address cannot be sent to: {exc}"[:500])
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
                return Outcome("retry", detail=f"{type(exc).__name__}: {exc}"[:500])
            finally:
                if client is not None:
                    if keep and client.is_connected:
                        self._idle.append(client)
                    else:
                        client.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            try:
                await asyncio.wait_for(client.quit(), 5)
            except Exception:
                client.close()


class EmlDeliverer:
    """The embedded default: each message written atomically as `{var_dir}/mail/{id}.eml`."""

    def __init__(self, core: Core) -> None:
        self.folder = Path(core.settings.var_dir) / "mail"
        self.mail_from = core.settings.mail_from

    async def deliver(self, message: Claimed) -> Outcome:
        try:
            data = build_message(message, self.mail_from)
        except (KeyError, ValueError, TypeError) as exc:
            return Outcome("dead", detail=f"The message cannot be built: {exc}")
        path = self.folder / f"{message.id}.eml"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{message.id}.tmp"
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)  # readers never see half a message
        except OSError as exc:
            return Outcome("retry", detail=f"Cannot write {path}: {exc.strerror}")
        return Outcome("sent", detail=f"written to {path}")

    async def close(self) -> None:
        return None


def deliverer(core: Core) -> SmtpDeliverer | EmlDeliverer:
    return SmtpDeliverer(core) if core.settings.smtp_url else EmlDeliverer(core)


register("mail", deliverer)
