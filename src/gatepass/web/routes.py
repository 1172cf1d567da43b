"""Server-rendered pages (CONTRACT §6). They call the same services as the public API."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from gatepass import errors
from gatepass.api.http import SESSION_COOKIE, CoreDep, client_ip, make_context
from gatepass.api.public.routes import clear_session_cookie, set_session_cookie
from gatepass.auth import service as auth
from gatepass.core import Core
from gatepass.ratelimit import service as ratelimit
from gatepass.users import service as users
from gatepass.users.schemas import ProfileUpdate
from gatepass.web import csrf

router = APIRouter()

NOTICES = {
    "changed": "Your password was changed.",
    "signed_out": "You are signed out.",
    "profile": "Your profile was saved.",
    "reset": "Your password was reset. Sign in with your new password.",
    "set": "Your password is set. Sign in with it now.",
    "registered": "Your account is ready. Sign in now.",
    "verified": "Your email address is confirmed. Sign in now.",
}


def templates(request: Request) -> Jinja2Templates:
    return request.app.state.templates  # type: ignore[no-any-return]


def render(request: Request, core: Core, name: str, status: int = 200,
           **values: Any) -> HTMLResponse:
    values.setdefault("error", None)
    values.setdefault("min_length", core.site["password.min_length"])
    values.setdefault("notice", NOTICES.get(request.query_params.get("notice", "")))
    values.setdefault("registration_open", core.site["registration.enabled"] and (
        core.site["registration.open"] or core.site["registration.invitation"]))
    response = templates(request).TemplateResponse(
        request, name, {"site_name": core.site["site.name"], "csrf_token":
                        csrf.token_for(request, core.secret_key), **values},
        status_code=status)
    csrf.persist(request, response, core.settings.secure_cookies)
    response.headers["Cache-Control"] = "no-store"
    return response


def refuse_login_form(request: Request, core: Core, template: str, limit: str,
                      login: str) -> HTMLResponse | None:
    """The one-field forms (forgot password, resend verification): the page again for an
    empty field or too many requests, else None."""
    if not login:
        return render(request, core, template, 422, login="",
                      error="Enter your username or email address.")
    try:
        ratelimit.check(core, limit, ip=client_ip(request), target=login)
    except errors.RateLimited as exc:
        response = render(request, core, template, 429, login=login,
                          error="Too many requests. Wait a few minutes and try again.")
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    return None


def redirect(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)


def current(request: Request, core: Core) -> auth.Authenticated | None:
    return auth.authenticate(core, request.cookies.get(SESSION_COOKIE))


def safe_next(value: str | None) -> str:
    """Only same-site paths: an open redirect would make our sign-in page a phishing tool."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/profile"


def page_guard(request: Request, core: Core) -> auth.Authenticated | Response:
    """Signed in and not held by a forced password change, or a redirect that says where to go."""
    found = current(request, core)
    if found is None:
        return redirect("/signin?next=" + quote(request.url.path))
    if found.password_change_required:
        return redirect("/password/change")
    return found


CsrfField = Annotated[str, Form(max_length=200)]


@router.get("/", include_in_schema=False)
def home(request: Request, core: CoreDep) -> Response:
    return redirect("/profile" if current(request, core) else "/signin")


@router.get("/signin", response_class=HTMLResponse)
def signin_page(request: Request, core: CoreDep, next: str | None = None) -> Response:
    found = current(request, core)
    if found is not None:
        return redirect("/password/change" if found.password_change_required else safe_next(next))
    return render(request, core, "signin.html", next=safe_next(next), login="")


@router.post("/signin", response_class=HTMLResponse)
def signin_submit(request: Request, core: CoreDep, csrf_token: CsrfField,
                  login: Annotated[str, Form(max_length=320)] = "",
                  password: Annotated[str, Form(max_length=4096)] = "",
                  next: Annotated[str, Form(max_length=2000)] = "") -> Response:
    csrf.verify(request, core.secret_key, csrf_token)
    try:
        ratelimit.check(core, "signin", ip=client_ip(request), target=login)
        result = auth.signin(core, make_context(request, "portal"), login, password)
    except errors.RateLimited:
        return render(request, core, "signin.html", 429, login=login, next=safe_next(next),
                      error="Too many sign-in attempts. Wait a few minutes and try again.")
    except errors.Locked as exc:
        message = ("Too many failed sign-ins. Try again after "
                   f"{exc.locked_until.strftime('%H:%M UTC')}.")
        return render(request, core, "signin.html", 423, error=message, login=login,
                      next=safe_next(next))
    except (errors.InvalidCredentials, errors.LoginDisabled, errors.EmailNotVerified) as exc:
        status = 401 if isinstance(exc, errors.InvalidCredentials) else 403
        return render(request, core, "signin.html", status, error=exc.message, login=login,
                      next=safe_next(next))
    response = redirect("/password/change" if result.password_change_required
                        else safe_next(next))
    set_session_cookie(core, response, result.token)
    return response


@router.get("/signout", response_class=HTMLResponse)
def signout_page(request: Request, core: CoreDep) -> Response:
    if current(request, core) is None:
        return redirect("/signin")
    return render(request, core, "signout.html")


@router.post("/signout")
def signout_submit(request: Request, core: CoreDep, csrf_token: CsrfField) -> Response:
    csrf.verify(request, core.secret_key, csrf_token)
    auth.signout(core, request.cookies.get(SESSION_COOKIE))
    response = redirect("/signin?notice=signed_out")
    clear_session_cookie(core, response)
    return response


@router.get("/profile", response_class=HTMLResponse)
def profile_page(request: Request, core: CoreDep) -> Response:
    found = page_guard(request, core)
    if isinstance(found, Response):
        return found
    return render(request, core, "profile.html", user=found.user)


@router.post("/profile", response_class=HTMLResponse)
def profile_submit(request: Request, core: CoreDep, csrf_token: CsrfField,
                   first_name: Annotated[str, Form(max_length=150)] = "",
                   last_name: Annotated[str, Form(max_length=150)] = "",
                   phone: Annotated[str, Form(max_length=50)] = "") -> Response:
    csrf.verify(request, core.secret_key, csrf_token)
    found = page_guard(request, core)
    if isinstance(found, Response):
        return found
    ctx = make_context(request, "portal", "user", found.user_id)
    users.update_profile(core, ctx, found.user_id, ProfileUpdate(
        first_name=first_name.strip() or None, last_name=last_name.strip() or None,
        phone=phone.strip() or None))
    return redirect("/profile?notice=profile")


@router.get("/password/change", response_class=HTMLResponse)
def change_page(request: Request, core: CoreDep) -> Response:
    found = current(request, core)
    if found is None:
        return redirect("/signin?next=/password/change")
    return render(request, core, "password_change.html", forced=found.password_change_required,
                  username=found.username)


@router.post("/password/change", response_class=HTMLResponse)
def change_submit(request: Request, core: CoreDep, csrf_token: CsrfField,
                  current_password: Annotated[str, Form(max_length=4096)] = "",
                  new_password: Annotated[str, Form(max_length=4096)] = "",
                  confirm_password: Annotated[str, Form(max_length=4096)] = "") -> Response:
    csrf.verify(request, core.secret_key, csrf_token)
    found = current(request, core)
    if found is None:
        return redirect("/signin?next=/password/change")

    def again(message: str, status: int) -> Response:
        return render(request, core, "password_change.html", status, error=message,
                      forced=found.password_change_required, username=found.username)

    if new_password != confirm_password:
        return again("The new passwords do not match.", 422)
    try:
        auth.change_password(core, make_context(request, "portal", "user", found.user_id),
                             found.user_id, found.session_id, current_password, new_password)
    except (errors.InvalidCredentials, errors.InvalidInput) as exc:
        return again(exc.message, 401 if isinstance(exc, errors.InvalidCredentials) else 422)
    return redirect("/profile?notice=changed")
