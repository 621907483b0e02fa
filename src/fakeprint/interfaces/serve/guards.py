"""What every request passes before the app's routes: the Host check and the API token, then the security
headers of every answer and one log line (and one count, ``serve.metrics``) per request."""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from fakeprint.interfaces.serve.metrics import ServiceMetrics

log = logging.getLogger("fakeprint.serve")
# The page loads nothing from elsewhere; the policy makes sure of it.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# Swagger UI and ReDoc (served from the package by fastapi-offline) start from an inline script and ReDoc runs a
# worker from a blob: still nothing from elsewhere, and no page may frame them
DOCS_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
API_CSP = "default-src 'none'; frame-ancestors 'none'"
HOST_RE = re.compile(r"(?P<name>\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::[0-9]{1,5})?")


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


# answers to requests refused for what they sent: held back until ``refusal_delay`` after their arrival
REFUSALS = frozenset({400, 401, 413, 415, 422})


def add_guards(app: FastAPI, token: str | None, allowed_hosts: list[str] | None,
               metrics: ServiceMetrics | None = None, refusal_delay: float = 0.0) -> None:
    """The Host check and the API token (before anything else runs), the security headers of every answer, and
    refusals held back until ``refusal_delay`` seconds after the request arrived (``uploads.Limits``)."""
    hosts = [h.lower() for h in allowed_hosts] if allowed_hosts else None
    public = ("/healthz", "/", "/favicon.ico")

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if hosts is not None and "*" not in hosts:
            host = request.headers.get("host", "").lower()
            m = HOST_RE.fullmatch(host)  # a name and an optional port, nothing else (no user part, no path)
            if m is None or m["name"].strip("[]") not in {h.strip("[]") for h in hosts}:
                return error_response(400, "invalid_host", f"Host {host!r} is not served here (--allowed-hosts)")
        path = request.url.path
        if token is not None and path not in public and not path.startswith("/static/"):
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                return error_response(401, "unauthorized", "this service needs an API token: send the header "
                              "'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers["X-Frame-Options"] = "DENY"
        path = request.url.path
        if path == "/" or path.startswith("/static/"):
            response.headers["Content-Security-Policy"] = PAGE_CSP
            response.headers["Referrer-Policy"] = "no-referrer"
        elif path.startswith(("/docs", "/redoc")):
            response.headers["Content-Security-Policy"] = DOCS_CSP
            response.headers["Referrer-Policy"] = "no-referrer"
        else:
            response.headers.setdefault("Content-Security-Policy", API_CSP)
        return response

    @app.middleware("http")
    async def _request_log(request: Request, call_next):
        """Outermost: every request gets an id (``X-Request-ID``) and one log line, whatever answered it."""
        request.state.request_id = rid = uuid.uuid4().hex[:12]
        t0 = time.perf_counter()
        client = f"{request.client.host}:{request.client.port}" if request.client else "-"
        try:
            response = await call_next(request)
        except Exception:
            log.info("%s %s %s %s 500 %.1f ms", rid, client, request.method, request.url.path,
                     (time.perf_counter() - t0) * 1e3)
            if metrics is not None:
                metrics.count_request(request.url.path, 500)
            raise
        if metrics is not None:
            metrics.count_request(request.url.path, response.status_code)
        if response.status_code in REFUSALS and refusal_delay > 0:  # no CPU while it waits: others get the cores
            await anyio.sleep(max(0.0, refusal_delay - (time.perf_counter() - t0)))
        response.headers["X-Request-ID"] = rid
        log.info("%s %s %s %s %d %.1f ms", rid, client, request.method, request.url.path, response.status_code,
                 (time.perf_counter() - t0) * 1e3)
        return response
