"""What the routers share: error translation, the core, the caller's context, authentication."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

from fastapi import BackgroundTasks, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from gatepass import errors
from gatepass.auth import service as auth
from gatepass.auth.models import ApiKey
from gatepass.context import Context, TriggeredBy
from gatepass.core import Core

log = logging.getLogger("gatepass.http")
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

SESSION_COOKIE = "gatepass_session"

# Every body but an import's (which streams, with its own per-line limit) is at most this:
# an unauthenticated caller must not make the server hold gigabytes while it parses.
MAX_BODY = 1024 * 1024


def body_too_large() -> errors.TooLarge:
    return errors.TooLarge(
        f"The request body is too large: at most {MAX_BODY // 1024 // 1024} MiB.")

STATUS: dict[type[errors.GatepassError], int] = {
    errors.InvalidToken: 400,
    errors.InvitationInvalid: 400,
    errors.InvalidInput: 422,
    errors.TooLarge: 413,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.Unauthenticated: 401,
    errors.InvalidCredentials: 401,
    errors.Forbidden: 403,
    errors.LoginDisabled: 403,
    errors.EmailNotVerified: 403,
    errors.PasswordChangeRequired: 403,
    errors.RegistrationClosed: 403,
    errors.InvitationRequired: 403,
    errors.UserRejected: 403,
    errors.Locked: 423,
    errors.RateLimited: 429,
}


def status_of(exc: errors.GatepassError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]  # type: ignore[index]
    return 400


def error_body(code: str, message: str, field: str | None = None,
               **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if field:
        body["field"] = field
    body.update(extra)
    return {"error": body}


def _field_of(loc: tuple[Any, ...]) -> str | None:
    parts = [str(part) for part in loc
             if part not in ("body", "query", "path", "header") and not isinstance(part, int)]
    return ".".join(parts) or None


def _validation_message(error: dict[str, Any], field: str | None) -> str:
    kind = error.get("type", "")
    if kind == "missing" and not field:
        return "A JSON body is required."
    if kind == "missing":
        return f"'{field}' is required."
    if kind == "extra_forbidden":
        return f"'{field}' is not a field this endpoint accepts."
    if kind == "json_invalid":
        return "The body is not valid JSON."
    if kind in ("model_attributes_type", "model_type", "dict_type") and not field:
        return "The body must be a JSON object."
    message = errors.validation_reason(error)
    return f"'{field}': {message}." if field else f"{message}."


def invalid_input(validation_errors: Sequence[Any]) -> errors.InvalidInput:
    """The first of pydantic's (or FastAPI's) validation errors as one sentence."""
    first = validation_errors[0] if validation_errors else {}
    field = _field_of(tuple(first.get("loc", ())))
    return errors.InvalidInput(_validation_message(first, field), field=field)


async def json_body(request: Request, model: type[M], *, limit: int) -> M:
    """The request's JSON body as `model`, for plain routes (FastAPI routes get theirs from
    FastAPI, with the same answers): a JSON content type, at most `limit` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.TooLarge()
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise errors.InvalidInput("A JSON body is required.")
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if not (media_type == "application/json"
            or (media_type.startswith("application/") and media_type.endswith("+json"))):
        raise errors.InvalidInput("The body must be a JSON object.")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise invalid_input(exc.errors()) from None


def crash_response(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    return JSONResponse(error_body("internal", "Something went wrong on our side."),
                        status_code=500)


def error_response(exc: errors.GatepassError) -> JSONResponse:
    headers = {}
    if isinstance(exc, errors.RateLimited):
        headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, errors.Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc.code, exc.message, exc.field, **exc.extra),
                        status_code=status_of(exc), headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.GatepassError)
    async def _domain(_request: Request, exc: errors.GatepassError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(invalid_input(exc.errors()))

    # Starlette's class, so its own 404/405 and FastAPI's (a subclass) both get the error shape.
    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        codes = {400: "invalid", 404: "not_found", 405: "method_not_allowed",
                 401: "unauthenticated", 403: "forbidden", 413: "too_large"}
        message = exc.detail if isinstance(exc.detail, str) else "The request failed."
        if exc.status_code == 400 and message == "There was an error parsing the body":
            message = "The body could not be read as JSON text."
        if exc.status_code == 413:  # a body without a length, counted past the apps' limit
            message = body_too_large().message
        if exc.status_code == 404 and message == "Not Found":
            message = "There is nothing at this address."
        if exc.status_code == 405:
            message = "This method is not allowed here."
        return JSONResponse(error_body(codes.get(exc.status_code, "error"), message),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return crash_response(request, exc)


# -- dependencies -------------------------------------------------------------------------------

async def get_core(request: Request) -> Core:
    return request.app.state.core  # type: ignore[no-any-return]


CoreDep = Annotated[Core, Depends(get_core)]


def client_ip(request: Request) -> str | None:
    core: Core = request.app.state.core
    if core.settings.trust_proxy_headers:
        forwarded = request.headers.get("x-forwarded-for")
        if forwarded:
            return forwarded.split(",")[0].strip()
    return request.client.host if request.client else None


def make_context(request: Request, triggered_by: TriggeredBy, actor_type: str | None = None,
                 actor_id: str | None = None) -> Context:
    return Context(triggered_by=triggered_by, actor_type=actor_type, actor_id=actor_id,
                   ip_address=client_ip(request),
                   user_agent=request.headers.get("user-agent"))


def after_the_answer(background: BackgroundTasks, job: Callable[..., object], *args: Any,
                     failure: str) -> None:
    """Do `job(*args)` once the answer is sent, so its timing cannot tell who exists (forgot
    password, resend verification); a failure is logged as `failure`, never shown."""
    def run() -> None:
        try:
            job(*args)
        except Exception:
            log.exception(failure)

    background.add_task(run)


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


# Admin API ------------------------------------------------------------------------------------

def require_scope(scope: str) -> Any:
    """Admin key with `admin`, the named scope, or `read` for reads."""

    async def dependency(request: Request, core: CoreDep) -> ApiKey:
        key = await quick_read(core, auth.authenticate_api_key, core, bearer(request))
        if key is None:
            raise errors.Unauthenticated("A valid admin API key is required.")
        allowed = "admin" in key.scopes or scope in key.scopes or (
            request.method in ("GET", "HEAD") and "read" in key.scopes)
        if not allowed:
            raise errors.Forbidden(f"This API key lacks the '{scope}' scope.")
        request.state.api_key = key
        return key

    return Depends(dependency)


async def admin_context(request: Request) -> Context:
    key: ApiKey = request.state.api_key
    return make_context(request, "admin_api", "api_key", key.id)


AdminCtx = Annotated[Context, Depends(admin_context)]


# Public API -----------------------------------------------------------------------------------

def session_token(request: Request) -> str | None:
    return bearer(request) or request.cookies.get(SESSION_COOKIE)


# What a session held by a forced password change may still do (CONTRACT §4).
FORCED_CHANGE_OPEN = {("POST", "/auth/password/change"), ("POST", "/auth/signout")}


async def forced_change_guard(request: Request) -> None:
    """A dependency of the whole public API app, so every route, including those features add
    later, answers 403 password_change_required to a session that must change its password.

    Async on purpose, like the other dependencies here: a sync dependency costs a hop to the
    thread pool, more than the one indexed read `auth.authenticate` makes (see `quick_read`)."""
    found = await _authenticated(request)
    if found is None or not found.password_change_required:
        return
    path, root = request.scope["path"], request.scope.get("root_path", "")
    if (request.method, path.removeprefix(root) or "/") in FORCED_CHANGE_OPEN:
        return
    raise errors.PasswordChangeRequired()


async def _authenticated(request: Request) -> auth.Authenticated | None:
    """The session behind this request, looked up once however many dependencies ask."""
    try:
        return request.state.auth  # type: ignore[no-any-return]
    except AttributeError:
        token = session_token(request)
        core: Core = request.app.state.core
        found = await quick_read(core, auth.authenticate, core, token, on_loop=True) \
            if token else None
        request.state.auth = found
        return found


async def quick_read(core: Core, read: Callable[..., T], *args: Any, **on_loop: Any) -> T:
    """Run one quick indexed read: on the event loop when the database is a local file (a
    thread hop would cost more than the read), with `on_loop` as keyword arguments; in the
    thread pool when it is a server (the loop must not wait on the network)."""
    if core.db.is_local:
        return read(*args, **on_loop)
    return await run_in_threadpool(read, *args)


async def _current(request: Request) -> auth.Authenticated:
    found = await _authenticated(request)
    if found is None:
        raise errors.Unauthenticated()
    return found


async def current_ready(request: Request) -> auth.Authenticated:
    """Every route but password change and sign-out: a forced change blocks them all."""
    found = await _current(request)
    if found.password_change_required:
        raise errors.PasswordChangeRequired()
    return found


CurrentAnyState = Annotated[auth.Authenticated, Depends(_current)]
Current = Annotated[auth.Authenticated, Depends(current_ready)]


def user_context(request: Request, found: auth.Authenticated) -> Context:
    return make_context(request, "portal", "user", found.user_id)
