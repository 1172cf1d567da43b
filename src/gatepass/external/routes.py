"""Pages for external sign-in: the round trip to a provider, and linking on the account page."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from gatepass import errors
from gatepass.api.http import CoreDep, make_context, status_of
from gatepass.api.public.routes import set_session_cookie
from gatepass.external import providers, service
from gatepass.web import csrf
from gatepass.web.routes import CsrfField, current, page_guard, redirect, render, safe_next

if TYPE_CHECKING:
    from gatepass.core import Core

router = APIRouter()

NOTICES = {
    "linked": "The sign-in method was linked to your account.",
    "unlinked": "The sign-in method was removed from your account.",
}


class ProviderButtons:
    """`providers` in every template: the enabled providers, read when a page iterates them."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def _items(self) -> list[dict[str, str]]:
        return [{"id": row.slug, "label": row.display_name}
                for row in providers.list_providers(self.core, enabled_only=True)]

    def __iter__(self) -> Iterator[dict[str, str]]:
        return iter(self._items())

    def __bool__(self) -> bool:
        return bool(self._items())


def install(app: FastAPI, admin: FastAPI, public: FastAPI, core: Core) -> None:
    app.state.templates.env.globals["providers"] = ProviderButtons(core)
    app.include_router(router)


def _failure(request: Request, core: Core, exc: errors.GatepassError,
             link: str = "/signin") -> Response:
    response = request.app.state.templates.TemplateResponse(
        request, "message.html",
        {"site_name": core.site["site.name"], "heading": "Sign-in did not work",
         "text": exc.message, "link": link,
         "link_text": "Back to your sign-in methods" if link != "/signin" else "Back to sign in",
         "error": None, "notice": None},
        status_code=status_of(exc))
    response.headers["Cache-Control"] = "no-store"
    _forget(core, response)
    return response


def _forget(core: Core, response: Response) -> None:
    response.delete_cookie(service.STATE_COOKIE, path=service.STATE_COOKIE_PATH, httponly=True,
                           samesite="lax", secure=core.settings.secure_cookies)


def _go(core: Core, started: service.Started) -> Response:
    response = RedirectResponse(started.url, status_code=303)
    # SameSite=Lax: the provider's redirect back is a top-level GET, which carries it.
    response.set_cookie(service.STATE_COOKIE, started.cookie, max_age=service.STATE_LIFETIME,
                        path=service.STATE_COOKIE_PATH, httponly=True, samesite="lax",
                        secure=core.settings.secure_cookies)
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("/signin/external/{slug}", include_in_schema=False)
def external_start(request: Request, core: CoreDep, slug: str, invitation: str | None = None,
                   next: str | None = None) -> Response:
    try:
        started = service.start(core, slug, invitation=invitation, next=safe_next(next))
    except errors.GatepassError as exc:
        return _failure(request, core, exc)
    return _go(core, started)


@router.get("/signin/external/{slug}/callback", include_in_schema=False)
def external_callback(request: Request, core: CoreDep, slug: str) -> Response:
    found = current(request, core)
    params = {key: value for key, value in request.query_params.items()
              if key in ("state", "code", "error")}
    try:
        done = service.finish(core, make_context(request, "external_login"), slug,
                              cookie=request.cookies.get(service.STATE_COOKIE), params=params,
                              current_user_id=found.user_id if found else None)
    except errors.GatepassError as exc:
        linking = found is not None and request.cookies.get(service.STATE_COOKIE) is not None \
            and _mode_of(core, request) == "link"
        return _failure(request, core, exc, "/profile/identities" if linking else "/signin")
    if done.kind == "linked":
        response = redirect("/profile/identities?notice=linked")
    elif done.kind == "created_unverified":
        response = request.app.state.templates.TemplateResponse(
            request, "message.html",
            {"site_name": core.site["site.name"], "heading": "Check your email",
             "text": "Your account was created. Verify your email address with the link we "
                     "sent you, then sign in.", "link": "/signin", "link_text": "Sign in",
             "error": None, "notice": None})
    else:
        response = redirect("/password/change" if done.password_change_required else done.next)
        if done.token:
            set_session_cookie(core, response, done.token)
    _forget(core, response)
    return response


def _mode_of(core: Core, request: Request) -> str | None:
    try:
        return service.unseal(core.secret_key, request.cookies.get(service.STATE_COOKIE)).mode
    except errors.GatepassError:
        return None


# -- the account page ---------------------------------------------------------------------------

def _identities_page(request: Request, core: Core, user_id: str, status: int = 200,
                     error: str | None = None) -> Response:
    linked = service.identities_of(core, user_id)
    buttons = list(ProviderButtons(core))
    names = {b["id"]: b["label"] for b in buttons}
    for row in linked:
        row["label"] = names.get(row["provider"], row["provider"])
    linked_slugs = {row["provider"] for row in linked}
    return render(request, core, "external_identities.html", status, error=error,
                  identities=linked, available=[b for b in buttons if b["id"] not in linked_slugs],
                  notice=NOTICES.get(request.query_params.get("notice", "")))


@router.get("/profile/identities", response_class=HTMLResponse, include_in_schema=False)
def identities_page(request: Request, core: CoreDep) -> Response:
    found = page_guard(request, core)
    if isinstance(found, Response):
        return found
    return _identities_page(request, core, found.user_id)


@router.post("/profile/identities/link", include_in_schema=False)
def identities_link(request: Request, core: CoreDep, csrf_token: CsrfField,
                    provider: Annotated[str, Form(max_length=64)] = "") -> Response:
    csrf.verify(request, core.secret_key, csrf_token)
    found = page_guard(request, core)
    if isinstance(found, Response):
        return found
    try:
        started = service.start(core, provider, mode="link", user_id=found.user_id)
    except errors.GatepassError as exc:
        return _identities_page(request, core, found.user_id, status_of(exc), exc.message)
    return _go(core, started)


@router.post("/profile/identities/{identity_id}/unlink", include_in_schema=False)
def identities_unlink(request: Request, core: CoreDep, identity_id: str,
                      csrf_token: CsrfField) -> Response:
    csrf.verify(request, core.secret_key, csrf_token)
    found = page_guard(request, core)
    if isinstance(found, Response):
        return found
    try:
        service.unlink(core, make_context(request, "portal", "user", found.user_id),
                       found.user_id, identity_id)
    except (errors.Forbidden, errors.NotFound) as exc:
        return _identities_page(request, core, found.user_id, status_of(exc), exc.message)
    return redirect("/profile/identities?notice=unlinked")
