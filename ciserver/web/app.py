"""The ASGI application: REST API, public pages, health and metrics (FastAPI)."""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import secrets
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import metrics as metrics_mod
from ..services.context import Services
from . import api, console, pages, public, reports_api
from .errors import ApiError, BodyLimit
from .ratelimit import RateLimiter

log = logging.getLogger(__name__)

SWAGGER_CDN = "https://cdn.jsdelivr.net"
# Swagger UI for /api/docs, pinned, with Subresource Integrity: the page shares its origin
# with the console, so a changed file on the CDN must not run. The hashes are sha384 of the
# files in the npm package swagger-ui-dist 5.35.0 (what jsDelivr serves).
_SWAGGER = f"{SWAGGER_CDN}/npm/swagger-ui-dist@5.35.0"
_SWAGGER_JS = (f"{_SWAGGER}/swagger-ui-bundle.js",
               "sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9")
_SWAGGER_CSS = (f"{_SWAGGER}/swagger-ui.css",
                "sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I")


def _allowed(ip: str, networks: list[str]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(n, strict=False) for n in networks)


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The one shape of every API error."""
    return {"error": {"code": code, "message": message, **extra}}


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 409: "conflict", 413: "too_large",
                 415: "unsupported_media_type", 422: "invalid", 429: "rate_limited",
                 500: "internal"}


# CORS exactly as third-party invite buttons need it, and nowhere else: any site may POST a
# JSON or form body to the two public invite endpoints (no cookies, no credentials).
_CORS_PATH = re.compile(r"^/api/v1/(?:events/(?P<event_id>[^/]+)/invites|invites)$")
_CORS_ORIGIN = (b"access-control-allow-origin", b"*")
_CORS_PREFLIGHT = [_CORS_ORIGIN, (b"access-control-allow-methods", b"POST, OPTIONS"),
                   (b"access-control-allow-headers", b"Content-Type"),
                   (b"access-control-max-age", b"86400"), (b"allow", b"POST, OPTIONS")]


class PublicCors:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _CORS_PATH.match(scope["path"]):
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS":  # the preflight, answered here
            await send({"type": "http.response.start", "status": 204,
                        "headers": _CORS_PREFLIGHT})
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return

        async def with_origin(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), _CORS_ORIGIN]}
            await send(message)

        await self.app(scope, receive, with_origin)


class SecurityHeaders:
    """X-Content-Type-Options on every answer; on HTML pages a Content-Security-Policy with a
    fresh nonce (``request.state.csp_nonce``: templates put it on their one <style> element,
    a page's colors; scripts only ever come from our own files, see public.csp) and
    Referrer-Policy. A header the endpoint set itself is kept. Plain ASGI: Starlette's
    BaseHTTPMiddleware (``@app.middleware``) cost every request a task group and a stream."""

    def __init__(self, app: ASGIApp, csp: Callable[[str], str]) -> None:
        self.app, self.csp = app, csp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nonce = ""
        if not scope["path"].startswith("/api/"):  # API answers are JSON: no nonce to make
            nonce = secrets.token_urlsafe(18)
            scope.setdefault("state", {})["csp_nonce"] = nonce

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(raw=list(message.get("headers", [])))
                headers.setdefault("X-Content-Type-Options", "nosniff")
                if headers.get("content-type", "").startswith("text/html"):
                    headers.setdefault("Content-Security-Policy",
                                       self.csp(nonce or secrets.token_urlsafe(18)))
                    headers.setdefault("Referrer-Policy", "no-referrer")
                message = {**message, "headers": headers.raw}
            await send(message)

        await self.app(scope, receive, with_headers)


class CiApp(FastAPI):
    """The FastAPI application with a front door: POSTs to the two public invite endpoints go
    straight to :func:`api.public_fast` (behind the body limit, with the CORS and nosniff
    headers those routes need), skipping the framework's middleware stack and routing, which
    were a tenth of the endpoint's cost (bench/web). Everything else, the preflight OPTIONS
    of those routes included, takes the normal way."""

    fast: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.fast is not None and scope["type"] == "http" and scope["method"] == "POST"
                and (m := _CORS_PATH.match(scope["path"])) is not None):
            scope["app"] = self
            scope["path_params"] = {"event_id": m["event_id"]} if m["event_id"] else {}
            await self.fast(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] == "HEAD":
            # HEAD is GET without the body (RFC 9110 9.3.2): uptime monitors and link
            # checkers use it. FastAPI's GET routes would answer 405.
            await super().__call__({**scope, "method": "GET"}, receive, _headers_only(send))
            return
        await super().__call__(scope, receive, send)


def _headers_only(send: Send) -> Send:
    async def without_body(message: Message) -> None:
        if message["type"] == "http.response.body":
            if message.get("more_body", False):
                return
            message = {"type": "http.response.body", "body": b""}
        await send(message)

    return without_body


_FAST_HEADERS = [(b"content-type", b"application/json"), _CORS_ORIGIN,
                 (b"x-content-type-options", b"nosniff")]


async def _public_fast(scope: Scope, receive: Receive, send: Send) -> None:
    status, headers = 202, _FAST_HEADERS
    try:
        body = (await api.public_fast(Request(scope, receive))).model_dump_json().encode()
    except ApiError as exc:
        status, body = exc.status, json.dumps(error_body(exc.code, exc.message)).encode()
        headers = [*headers, *((k.lower().encode("latin-1"), v.encode("latin-1"))
                               for k, v in (exc.headers or {}).items())]
    except ClientDisconnect:  # gone before its body arrived: nobody to answer
        return
    except StarletteHTTPException as exc:  # a malformed form body (400), a body over the limit
        status = exc.status_code
        body = json.dumps(error_body(_STATUS_CODES.get(status, "error"), str(exc.detail))
                          ).encode()
    except Exception:  # what FastAPI's ServerErrorMiddleware would do on the normal way
        log.exception("public invite endpoint failed")
        status, body = 500, json.dumps(error_body("internal", "internal server error")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(svc: Services) -> FastAPI:
    # redirect_slashes off: Starlette's redirect to the path without its trailing slash builds
    # an absolute URL from the request's Host header and scheme (an open redirect, and http://
    # behind a TLS proxy); such paths get a plain 404 instead.
    app = CiApp(title="ciserver", version="0.1.0",
                description="Calendar invite server: real invites, counted answers.",
                docs_url=None, redoc_url=None, redirect_slashes=False)
    app.state.svc = svc
    app.state.ip_limiter = RateLimiter(svc.config.web.rate_limit, 60.0)
    app.state.address_limiter = RateLimiter(svc.config.web.rate_limit_per_address, 3600.0)
    app.state.event_limiter = RateLimiter(svc.config.web.rate_limit_per_event, 60.0)
    app.state.invites_limiter = RateLimiter(svc.config.web.rate_limit_invites_per_address,
                                            86400.0)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(e.get("type") == "json_invalid" for e in problems):
            return JSONResponse(error_body("bad_request", "the body is not valid JSON"),
                                status_code=400)
        details = [{"field": ".".join(str(p) for p in e.get("loc", ())[1:]),
                    "problem": e.get("msg", "")} for e in problems]
        first = details[0] if details else {"field": "", "problem": "invalid request"}
        msg = f"{first['field'] or 'request'}: {first['problem']}"
        return JSONResponse(error_body("invalid", msg, details=details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if not request.url.path.startswith("/api/"):
            return PlainTextResponse(str(exc.detail), status_code=exc.status_code,
                                     headers=exc.headers)
        code = _STATUS_CODES.get(exc.status_code, "error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method of the path, not only the first route's
            methods = {m for m in ("GET", "POST", "PUT", "PATCH", "DELETE")
                       if any(r.matches({**request.scope, "method": m})[0] == Match.FULL
                              for r in app.router.routes)}
            headers["Allow"] = ", ".join(sorted(methods)) or headers.get("Allow", "")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        # Starlette logs the traceback; the client gets the same shape as every other error.
        if not request.url.path.startswith("/api/"):
            return PlainTextResponse("Internal Server Error", status_code=500)
        return JSONResponse(error_body("internal", "internal server error"), status_code=500)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        async with svc.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return {"status": "ok", "domain": svc.book.domain}

    @app.get("/api/docs", include_in_schema=False)
    async def api_docs() -> Response:
        # FastAPI's Swagger UI page: its script and styles come from a CDN and it starts with
        # one inline script, so this page gets a policy of its own (our pages allow neither).
        nonce = secrets.token_urlsafe(18)
        page = get_swagger_ui_html(openapi_url="/openapi.json", title="ciserver API",
                                   swagger_js_url=_SWAGGER_JS[0],
                                   swagger_css_url=_SWAGGER_CSS[0],
                                   swagger_ui_parameters={"tryItOutEnabled": False})
        html = bytes(page.body).decode().replace("<script>", f'<script nonce="{nonce}">')
        for url, digest in (_SWAGGER_JS, _SWAGGER_CSS):
            html = html.replace(f'"{url}"',
                                f'"{url}" integrity="{digest}" crossorigin="anonymous"')
        return HTMLResponse(html, headers={"Content-Security-Policy": (
            f"default-src 'none'; script-src 'nonce-{nonce}' {SWAGGER_CDN}; "
            f"style-src {SWAGGER_CDN}; img-src 'self' data: https://fastapi.tiangolo.com; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")})

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    async def metrics(request: Request) -> Response:
        # Queue depths and rates are nobody else's business: [web] metrics_allow.
        if not _allowed(api.client_ip(request, svc.config.web.trusted_proxies),
                        svc.config.web.metrics_allow):
            return PlainTextResponse("Forbidden: see [web] metrics_allow", status_code=403)
        # Counters of the daemon and its worker processes, queue gauges from the database.
        body = await metrics_mod.exposition(svc.engine, svc.now())
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.include_router(api.router)
    app.include_router(reports_api.router)
    app.include_router(pages.router)
    app.include_router(public.router)
    app.include_router(console.router)

    app.add_middleware(BodyLimit, max_size=svc.config.web.max_body_size)
    app.fast = BodyLimit(_public_fast, max_size=svc.config.web.max_body_size)
    app.add_middleware(PublicCors)

    app.add_middleware(SecurityHeaders, csp=public.csp)

    return app
