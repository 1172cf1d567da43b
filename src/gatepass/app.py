"""create_app(settings): the whole web application, built when called and never at import."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.telemetry import TelemetryConfig
from fastapi.templating import Jinja2Templates
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gatepass import errors
from gatepass.api.admin.routes import router as admin_router
from gatepass.api.http import (MAX_BODY, body_too_large, error_response, forced_change_guard,
                               install_error_handlers, status_of)
from gatepass.api.public import routes as public_routes
from gatepass.core import Core, build_core
from gatepass.metrics import Metrics
from gatepass.settings import Settings, load_settings
from gatepass.web.routes import router as web_router

log = logging.getLogger("gatepass.app")

# Bodies read as they arrive, of any size (see api.http.MAX_BODY).
STREAMED = frozenset({"/admin/api/v1/users/import"})

# Gatepass counts requests itself (/metrics); FastAPI's OpenTelemetry bridge would look for a
# configured provider on every request.
NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}

# Each feature registers its routers and background tasks here (see `extensions`).
AppHook = Callable[[FastAPI, FastAPI, FastAPI, Core], None]


def create_app(settings: Settings | None = None, *, core: Core | None = None) -> FastAPI:
    settings = settings or load_settings()
    core = core or build_core(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for start in app.state.on_start:
            await start()
        try:
            yield
        finally:
            for stop in reversed(app.state.on_stop):
                await stop()
            core.close()

    app = GatepassApp(title="Gatepass", docs_url=None, redoc_url=None, openapi_url=None,
                      lifespan=lifespan, telemetry=NO_TELEMETRY, max_body_size=MAX_BODY)
    app.state.core = core
    app.state.on_start = []
    app.state.on_stop = []
    templates_dir = resources.files("gatepass.web").joinpath("templates")
    app.state.templates = Jinja2Templates(directory=str(templates_dir))

    admin = FastAPI(title="Gatepass admin API", version="1", docs_url="/docs", redoc_url=None,
                    openapi_url="/openapi.json", telemetry=NO_TELEMETRY, max_body_size=MAX_BODY)
    admin.state.core = core
    install_error_handlers(admin)
    admin.include_router(admin_router)

    public = FastAPI(title="Gatepass public API", version="1", docs_url="/docs", redoc_url=None,
                     openapi_url="/openapi.json", dependencies=[Depends(forced_change_guard)],
                     telemetry=NO_TELEMETRY, max_body_size=MAX_BODY)
    public.state.core = core
    install_error_handlers(public)
    public.include_router(public_routes.router)

    # /me and sign-in are the hottest requests: `HotLane` answers them ahead of the
    # framework's middleware. They are routes of `app` too (HEAD, and in `app.routes`), then
    # the API, which the router tries before the pages features add to `app` below.
    app.state.hot_routes = [
        CountedRoute("/api/v1/me", public_routes.me, methods=["GET"]),
        CountedRoute("/api/v1/auth/signin", public_routes.signin_route, methods=["POST"])]
    app.router.routes.extend(app.state.hot_routes)
    app.mount("/admin/api/v1", admin)
    app.mount("/api/v1", public)

    from gatepass import extensions

    for hook in extensions.hooks():
        hook(app, admin, public, core)

    app.include_router(web_router)
    static_dir = resources.files("gatepass.web").joinpath("static")
    app.mount("/static", StaticFiles(directory=str(static_dir)), name="static")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> JSONResponse:
        if core.db.ping():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(core.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(errors.GatepassError)
    async def page_error(request: Request, exc: errors.GatepassError) -> HTMLResponse:
        return app.state.templates.TemplateResponse(
            request, "message.html",
            {"site_name": core.site["site.name"], "heading": "That did not work",
             "text": exc.message, "link": request.url.path, "link_text": "Try again",
             "error": None, "notice": None},
            status_code=status_of(exc))

    return app


class GatepassApp(FastAPI):
    """FastAPI, with the request counter outermost and the hot lane inside it."""

    def build_middleware_stack(self) -> ASGIApp:
        hot = {(method, route.path): route for route in self.state.hot_routes
               for method in route.methods or () if method != "HEAD"}
        return RequestMetrics(BodyLimit(HotLane(super().build_middleware_stack(), hot)),
                              metrics=self.state.core.metrics)


class BodyLimit:
    """A body that says it is over MAX_BODY (Content-Length) is refused before anything reads
    it: 413 in the API's error shape. Bodies without a length are counted as they arrive by
    the framework's own limit (`max_body_size` of the apps, the import route exempt)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in STREAMED:
            for name, value in scope["headers"]:
                if name == b"content-length":
                    if not value.isdigit() or int(value) > MAX_BODY:
                        await error_response(body_too_large())(scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)


class HotLane:
    """Answers the few routes every visitor calls (GET /api/v1/me, POST /api/v1/auth/signin)
    straight from their endpoint, ahead of the framework's five middleware layers and its
    router, which together cost a tenth of /me. Those endpoints answer every error
    themselves, crashes included (`api.http.crash_response`); any other request, and any
    other method or spelling of these paths, goes through the whole stack as before."""

    def __init__(self, app: ASGIApp, routes: dict[tuple[str, str], Route]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = self.routes.get((scope["method"], scope["path"]))
            if route is not None:
                scope["route"] = route
                response = await route.endpoint(Request(scope, receive))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class CountedRoute(Route):
    """A plain Starlette route that names itself in the scope, as FastAPI's routes do, so
    `RequestMetrics` counts it under its path."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]
PAGE_POLICY = (b"content-security-policy",
               b"default-src 'self'; frame-ancestors 'none'; form-action 'self' https: http:; "
               b"base-uri 'none'")


class RequestMetrics:
    """Counts requests by route and status and adds the security headers every answer carries.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware costs more than the cheapest
    routes (GET /api/v1/me) themselves.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.requests = metrics.requests
        self._counters: dict[tuple[str, str, str], Any] = {}  # labels() once per route/status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                message = {**message, "headers": headers}
                present = {name.lower() for name, _ in headers}
                headers.extend(header for header in SECURITY_HEADERS if header[0] not in present)
                if b"content-security-policy" not in present and any(
                        name.lower() == b"content-type" and value.startswith(b"text/html")
                        for name, value in headers):
                    headers.append(PAGE_POLICY)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            route = scope.get("route")
            label = scope.get("root_path", "") + route.path if route is not None else "unmatched"
            method = scope["method"] if scope["method"] in METHODS else "OTHER"  # bounded labels
            key = (method, label, str(status))
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = self.requests.labels(*key)
            counter.inc()


def app_from_env() -> Any:
    """Factory for `uvicorn --factory` with several worker processes."""
    from gatepass import logs

    settings = load_settings()
    logs.configure(settings.log_level)
    application = create_app(settings)
    gc.freeze()  # what start-up built lives for good: keep it out of every collection
    return application
