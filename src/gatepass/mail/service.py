"""Queue a mail: render it now, inside the caller's transaction, into the outbox."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from gatepass.mail.render import render
from gatepass.outbox.models import OutboxMessage

if TYPE_CHECKING:
    from gatepass.core import Core


def queue_mail(session: Session, core: Core, kind: str, to: str, params: dict[str, Any], *,
               sensitive: bool = False) -> OutboxMessage:
    """Write one message to the outbox. It is sent only if the caller's transaction commits.

    `sensitive` marks a body carrying a password or a one-time link: it is scrubbed once the
    message is delivered or dead.
    """
    site_name = core.site["site.name"]
    values = {"site_name": site_name, "public_url": core.settings.public_url,
              "signin_url": core.link("/signin"), **params}
    rendered = render(kind, values, core.settings.mail_templates_dir)
    message = OutboxMessage(
        kind="mail", sensitive=sensitive,
        payload={"template": kind, "from": core.settings.mail_from, "to": to,
                 "subject": rendered.subject, "text": rendered.text, "html": rendered.html})
    session.add(message)
    return message
