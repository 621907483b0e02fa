"""Running the app with uvicorn, guarded against slow clients.

uvicorn (0.30 and later, h11 protocol) has no timeout for a request's headers: a connection that sends half
a request line is held until the client gives up, and with ``--max-connections`` a few such sockets make
every request, ``/healthz`` included, get 503. ``GuardedH11Protocol`` closes a connection whose headers
are not complete within ``header_timeout`` seconds (counted from the connection, or from the end of the
previous response on a kept-alive one), and exempts ``GET /healthz`` from the connection limit.
Timeouts inside the body are the app's (``uploads.read_form``).

Below the app, too: a request with both ``Content-Length`` and ``Transfer-Encoding`` is refused and its connection
closed (RFC 9112 section 6.3: the two disagree about where the body ends, which is how requests are smuggled), and
every error h11 raises on a malformed request is answered in the app's JSON shape, not uvicorn's plain text.
``configure_logging`` writes one line per event (request, header timeout, disconnect, error) to stderr, each with
its request or connection id and never a body.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from fakeprint.core.errors import FakeprintError
from fakeprint.interfaces.serve.app import create_app
from fakeprint.interfaces.serve.uploads import Limits

log = logging.getLogger("fakeprint.serve")
TOKEN_ENV = "FAKEPRINT_API_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
UNLIMITED_PATHS = ("/healthz",)


MIN_TOKEN_CHARS = 32
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_connections = itertools.count(1)


class StrictConnection(h11.Connection):
    """h11's server connection that refuses a request framed two ways (``Content-Length`` and
    ``Transfer-Encoding``) instead of letting ``Transfer-Encoding`` win silently, and keeps the reason of the last
    refusal for the answer."""

    last_error = ""

    def next_event(self):  # type: ignore[override]
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as e:
            self.last_error = str(e).split(":")[0][:80]  # h11's reason without the bytes it quotes
            raise
        if isinstance(event, h11.Request):
            names = {name.lower() for name, _ in event.headers}
            if b"content-length" in names and b"transfer-encoding" in names:
                self.last_error = "Content-Length together with Transfer-Encoding: refused (RFC 9112 section 6.3)"
                raise h11.RemoteProtocolError(self.last_error, 400)
        return event


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = 10.0

    def __init__(self, *args, **kwargs):
        self._limit = None
        self._header_timer = None
        super().__init__(*args, **kwargs)
        self.conn = StrictConnection(h11.SERVER, self.conn._max_incomplete_event_size)
        self.connection_id = f"c{next(_connections)}"

    def send_400_response(self, msg: str) -> None:  # type: ignore[override]
        """A malformed request, answered as the app answers errors (JSON), then the connection closed."""
        detail = getattr(self.conn, "last_error", "") or "malformed HTTP request"
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.info("%s %s: malformed request refused (%s)", self.connection_id, client, detail)
        body = json.dumps({"error": "bad_request", "detail": detail}).encode()
        head = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n")
        if not self.transport.is_closing():
            self.transport.write(head + body)
        self.transport.close()

    # uvicorn compares its connection and task counts with ``limit_concurrency`` right after it has built the
    # new request's scope; answering None there lets a liveness probe through however busy the server is.
    @property
    def limit_concurrency(self):  # type: ignore[override]
        scope = getattr(self, "scope", None)
        if scope is not None and scope.get("path") in UNLIMITED_PATHS and scope.get("method") in ("GET", "HEAD"):
            return None
        return self._limit

    @limit_concurrency.setter
    def limit_concurrency(self, value) -> None:
        self._limit = value

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # still waiting for (the rest of) a request's headers
            if self._header_timer is None and not self.transport.is_closing():
                self._arm_header_timer()
        else:
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # a kept-alive connection waits for its next request's headers (part of them may already be buffered,
        # pipelined behind the last request): the clock starts again now
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_header_timer()
        else:
            self._cancel_header_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            log.info("%s %s sent no complete request headers within %g s: connection closed", self.connection_id,
                     client, self.header_timeout)
            self.transport.close()


def check_exposure(host: str, token: str | None) -> None:
    """Binding beyond loopback needs an API token: refuse to start without one. A token, wherever it is used, must
    be strong: at least ``MIN_TOKEN_CHARS`` characters (a short one is guessed by anyone who can send requests)."""
    if token is not None and (len(token) < MIN_TOKEN_CHARS or len(set(token)) < 8):
        raise FakeprintError(f"{TOKEN_ENV} is too weak ({len(token)} characters): an API token guards the service "
                             f"against anyone who can reach it, so it must have at least {MIN_TOKEN_CHARS} characters "
                             "of several kinds; make one with: python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
    if host not in LOOPBACK and not token:
        raise FakeprintError(f"--host {host} makes the service reachable from other machines: set an API token in "
                             f"the environment variable {TOKEN_ENV} (clients then send 'Authorization: Bearer "
                             "<token>'), or bind 127.0.0.1")


def configure_logging(level: str = "info") -> None:
    """One line per event on stderr (``fakeprint.serve``): requests, header timeouts, disconnects, errors."""
    logger = logging.getLogger("fakeprint.serve")
    if not any(getattr(h, "_fakeprint", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._fakeprint = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level.upper() if level.upper() in logging.getLevelNamesMapping() else "INFO")
    logger.propagate = False


def default_allowed_hosts(host: str) -> list[str] | None:
    """The Host header values accepted when ``--allowed-hosts`` is not given: loopback names for a loopback
    bind (a web page elsewhere cannot reach the service through a rebound DNS name); any otherwise."""
    return ["127.0.0.1", "localhost", "::1"] if host in LOOPBACK else None


def run(service, host: str = "127.0.0.1", port: int = 8000, limits=None, workers: int = 2,
        log_level: str = "info", max_connections: int | None = None, allowed_hosts: list[str] | None = None,
        token: str | None = None, batching=None) -> None:
    """Serve ``service`` with uvicorn until interrupted. ``token`` defaults to ``$FAKEPRINT_API_TOKEN``."""
    import uvicorn

    limits = limits or Limits()
    token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
    check_exposure(host, token)
    app = create_app(service, limits, workers, token=token,
                     allowed_hosts=allowed_hosts if allowed_hosts is not None else default_allowed_hosts(host),
                     batching=batching)
    protocol = type("Protocol", (GuardedH11Protocol,), {"header_timeout": float(limits.header_timeout)})
    configure_logging(log_level)
    uvicorn.run(app, host=host, port=port, log_level=log_level, limit_concurrency=max_connections,
                timeout_keep_alive=5, server_header=False, http=protocol, access_log=False)
