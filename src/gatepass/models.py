"""Every table, imported in one place for Alembic and for mapper configuration."""

from gatepass.auth.models import ApiKey, LoginFailure, OneTimeToken, UserSession
from gatepass.db import Base
from gatepass.events.models import Event
from gatepass.external.models import ExternalProvider
from gatepass.invitations.models import Invitation, InvitationRedemption
from gatepass.outbox.models import OutboxAttempt, OutboxMessage
from gatepass.sitesettings.models import SiteSetting
from gatepass.users.models import Account, ExternalIdentity, Role, User, user_roles
from gatepass.webhooks.models import Webhook

__all__ = [
    "Account", "ApiKey", "Base", "Event", "ExternalIdentity", "ExternalProvider", "Invitation",
    "InvitationRedemption", "LoginFailure", "OneTimeToken", "Webhook",
    "OutboxAttempt", "OutboxMessage", "Role", "SiteSetting", "User", "UserSession", "user_roles",
]
