"""Running the app with uvicorn, guarded against slow clients.

uvicorn (0.30 and later, h11 protocol) has no timeout for a request's headers: a connection that sends half
a request line is held until the client gives up, and with ``--max-connections`` a few such sockets make
every request, ``/healthz`` included, get 503. ``GuardedH11Protocol`` closes a connection whose headers
are not complete within ``header_timeout`` seconds (counted from the connection, or from the end of the
previous response on a kept-alive one), and exempts ``GET /healthz`` from the connection limit.
Timeouts inside the body are the app's (``uploads.read_form``).
"""

from __future__ import annotations

import logging
import os

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from fakeprint.core.errors import FakeprintError
from fakeprint.interfaces.serve.app import create_app
from fakeprint.interfaces.serve.uploads import Limits

log = logging.getLogger("fakeprint.serve")
TOKEN_ENV = "FAKEPRINT_API_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
UNLIMITED_PATHS = ("/healthz",)


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = 10.0

    def __init__(self, *args, **kwargs):
        self._limit = None
        self._header_timer = None
        super().__init__(*args, **kwargs)

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
            log.info("%s sent no complete request headers within %g s: connection closed", client,
                     self.header_timeout)
            self.transport.close()


def check_exposure(host: str, token: str | None) -> None:
    """Binding beyond loopback needs an API token: refuse to start without one."""

    if host not in LOOPBACK and not token:
        raise FakeprintError(f"--host {host} makes the service reachable from other machines: set an API token in "
                             f"the environment variable {TOKEN_ENV} (clients then send 'Authorization: Bearer "
                             "<token>'), or bind 127.0.0.1")


def default_allowed_hosts(host: str) -> list[str] | None:
    """The Host header values accepted when ``--allowed-hosts`` is not given: loopback names for a loopback
    bind (a web page elsewhere cannot reach the service through a rebound DNS name); any otherwise."""
    return ["127.0.0.1", "localhost", "::1"] if host in LOOPBACK else None


def run(service, host: str = "127.0.0.1", port: int = 8000, limits=None, workers: int = 2,
        log_level: str = "info", max_connections: int | None = None, allowed_hosts: list[str] | None = None,
        token: str | None = None) -> None:
    """Serve ``service`` with uvicorn until interrupted. ``token`` defaults to ``$FAKEPRINT_API_TOKEN``."""
    import uvicorn


    limits = limits or Limits()
    token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
    check_exposure(host, token)
    app = create_app(service, limits, workers, token=token,
                     allowed_hosts=allowed_hosts if allowed_hosts is not None else default_allowed_hosts(host))
    protocol = type("Protocol", (GuardedH11Protocol,), {"header_timeout": float(limits.header_timeout)})
    uvicorn.run(app, host=host, port=port, log_level=log_level, limit_concurrency=max_connections,
                timeout_keep_alive=5, server_header=False, http=protocol)
